"""The planar inverse's scalar solve where plain safeguarded Newton stalls: with a large m the
Newton iterates can bounce between the flat ends of tanh, inside the bracket, and shrink it too
slowly to reach the root in the allowed iterations."""

import torch

from flowvae.flows.planar import planar_forward, planar_inverse


def test_inverse_reaches_the_root_where_newton_bounces():
    # A trained U1 layer (m = wᵀû = 6.84) and two of its inputs: for both, a + m tanh(a) = c
    # has its root at a ≈ 0.804, but Newton from a = c ≈ 5.36 alternated between about -1.5 and
    # 4, and the 200 steps ended at a ≈ -1.47, a preimage whose image is 3.6 away from y.
    u = torch.tensor([[-1.0492984056472778, 2.0914173126220703]], dtype=torch.float64)
    w = torch.tensor([[-2.6935789585113525, 2.398437261581421]], dtype=torch.float64)
    b = torch.tensor([[0.25731247663497925]], dtype=torch.float64)
    y = torch.tensor(
        [[0.10203617717116553, 1.9642890646038413], [-0.09932975342513595, 1.7381292495204776]],
        dtype=torch.float64,
    )
    z = planar_inverse(y, u, w, b)
    f_z, _ = planar_forward(z, u, w, b)
    torch.testing.assert_close(f_z, y, rtol=0, atol=1e-12)
