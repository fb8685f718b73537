"""The planar reference the stacked path is tested against: K layers run one by one with the
reference autograd ops (planar.planar_forward), and the agreement check."""

import torch

from flowvae.flows.planar import planar_forward


def layer_by_layer(z, packed, scaled, shift):
    """z_K and Σ log|det J| of the layers packed as (B|1, K, 2D + 1) rows of [u, w, b]."""
    d = z.shape[-1]
    total = z.new_zeros(z.shape[0])
    for k in range(packed.shape[1]):
        p = packed[:, k]
        z, ld = planar_forward(z, p[:, :d], p[:, d : 2 * d], p[:, 2 * d :], scaled, shift)
        total = total + ld
    return z, total


def values_and_grads(fn, z, packed, gy, gld):
    """fn's (y, ld) and the gradients of <y, gy> + <ld, gld> with respect to z and packed."""
    y, ld = fn(z, packed)
    grads = torch.autograd.grad((y * gy).sum() + (ld * gld).sum(), (z, packed))
    return y, ld, grads


def assert_agree(got, ref):
    """Float64 values to 1e-11; gradients to 1e-7 relative."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-11, atol=1e-11)
    for g_got, g_ref in zip(got[2], ref[2], strict=True):
        # Sums of the same terms in another order: with large parameters single gradient
        # entries are differences of much larger terms, so the tolerance follows their scale.
        scale_g = float(g_ref.abs().max())
        torch.testing.assert_close(g_got, g_ref, rtol=1e-7, atol=1e-9 * (1.0 + scale_g))


def gradcheck_inputs(batch_params: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small float64 z (4, 3) and packed parameters (batch_params, 5, 7) for gradcheck."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    packed = torch.randn(batch_params, 5, 7, generator=gen, dtype=torch.float64)
    return z, packed.requires_grad_()
