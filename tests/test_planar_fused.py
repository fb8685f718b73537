"""The fused planar layer (hand-written backward) against the reference autograd ops."""

import pytest
import torch

from flowvae.flows.planar import IDENTITY_SHIFT, SLACK, Planar, planar_forward
from flowvae.flows.planar_fused import planar_forward_fused


def _params(batch: int, dim: int, scale: float, gen: torch.Generator):
    def r(*shape):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    return r(batch, dim), r(batch, dim), r(batch, 1)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("batch_params", [1, 6], ids=["global", "amortised"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("shift", [0.0, IDENTITY_SHIFT])
def test_fused_matches_reference_values_and_gradients(scaled, batch_params, scale, shift):
    gen = torch.Generator().manual_seed(7)
    dim = 5
    z = torch.randn(6, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    u, w, b = (t[:batch_params].detach().requires_grad_() for t in _params(6, dim, scale, gen))
    gy = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(6, generator=gen, dtype=torch.float64)

    def run(fn):
        y, ld = fn(z, u, w, b)
        grads = torch.autograd.grad((y * gy).sum() + (ld * gld).sum(), (z, u, w, b))
        return y, ld, grads

    ref = run(lambda *a: planar_forward(*a, scaled_offset=scaled, shift=shift))
    fused = run(lambda *a: planar_forward_fused(*a, scaled, SLACK, shift))
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-12, atol=1e-12)
    for g_fused, g_ref in zip(fused[2], ref[2], strict=True):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("scaled", [True, False])
def test_fused_gradcheck(scaled):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    u, w, b = _params(4, 3, 1.0, gen)
    assert torch.autograd.gradcheck(
        lambda *a: planar_forward_fused(*a, scaled, SLACK), (z, u, w, b), eps=1e-6, atol=1e-6
    )


def test_global_layer_uses_fused_path_and_matches_reference(monkeypatch):
    torch.manual_seed(0)
    layer = Planar(4).double()
    z = torch.randn(8, 4, dtype=torch.float64)
    y_fused, ld_fused = layer(z)
    monkeypatch.setattr("flowvae.flows.planar.FUSED", False)
    y_ref, ld_ref = layer(z)
    torch.testing.assert_close(y_fused, y_ref)
    torch.testing.assert_close(ld_fused, ld_ref)
