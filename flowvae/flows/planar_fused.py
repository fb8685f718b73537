"""The planar layer as one autograd node with a hand-written backward.

Autograd records some 25 small ops per planar layer and replays ~50 in the backward pass; at
batch 100 and D = 40 those launches, not the arithmetic, are the cost of a deep flow. This
Function computes the same forward (see planar.py for the maths) without recording a graph and
returns all gradients in one pass. ``planar.planar_forward`` is the reference it is tested against.

Notation: wu = wᵀu, s = softplus(wu) + SLACK, c = (s - 1 - wu)/‖w‖², û = u + c·w,
a = wᵀz + ‖w‖·b̃ (or + b), t = tanh(a), h = 1 - t², y = z + û·t, ld = log(t² + s·h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clamped_norm_sq(w: Tensor, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """‖w‖² clamped up to the smallest normal number, and where the clamp passes gradient."""
    raw = (w * w).sum(-1, keepdim=keepdim)
    tiny = torch.finfo(w.dtype).tiny
    return raw.clamp_min(tiny), raw >= tiny


def refuse_double_backward() -> None:
    """Called first in a hand-written backward: with create_graph=True it would run under grad
    mode and return a gradient with no second-order part, so say so instead."""
    if torch.is_grad_enabled():
        raise RuntimeError("planar layers have no double backward (create_graph=True)")


class PlanarFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, z: Tensor, u: Tensor, w: Tensor, b: Tensor, scaled: bool, slack: float, shift: float
    ):
        wu = (w * u).sum(-1, keepdim=True)
        s = F.softplus(wu + shift) + slack
        wsq, live = clamped_norm_sq(w, keepdim=True)
        c = (s - 1.0 - wu) / wsq
        u_hat = torch.addcmul(u, c, w)
        a = (z * w).sum(-1, keepdim=True)
        n = wsq.sqrt() if scaled else None
        a = torch.addcmul(a, n, b) if scaled else a + b
        t = torch.tanh(a)
        h = 1.0 - t * t
        dn = torch.addcmul(t * t, s, h)
        y = torch.addcmul(z, u_hat, t)
        ctx.scaled, ctx.shift = scaled, shift
        ctx.save_for_backward(
            z, u, w, b, wu, s, wsq, c, u_hat, t, h, dn, n if scaled else wsq, live
        )
        return y, torch.log(dn).squeeze(-1).expand(z.shape[0])

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward()
        z, u, w, b, wu, s, wsq, c, u_hat, t, h, dn, n, live = ctx.saved_tensors
        g_ld = g_ld.unsqueeze(-1)
        g_ld_dn = g_ld / dn
        # ld = log(1 + (s - 1)·h): ∂ld/∂t = 2t(1 - s)/dn, ∂ld/∂s = h/dn
        g_t = (g_y * u_hat).sum(-1, keepdim=True) + g_ld_dn * 2.0 * t * (1.0 - s)
        g_a = g_t * h
        g_z = torch.addcmul(g_y, g_a, w)
        g_uhat = g_y * t
        g_c = (g_uhat * w).sum(-1, keepdim=True)
        g_s = g_ld_dn * h + g_c / wsq
        g_wu = g_s * torch.sigmoid(wu + ctx.shift) - g_c / wsq
        g_wsq = -g_c * c / wsq
        if ctx.scaled:
            g_b = g_a * n
            g_wsq = g_wsq + g_a * b / (2.0 * n)
        else:
            g_b = g_a
        g_wsq = torch.where(live, g_wsq, 0.0)
        g_u = torch.addcmul(g_uhat, g_wu, w)
        g_w = g_a * z + c * g_uhat + g_wu * u + 2.0 * g_wsq * w
        return (
            g_z,
            g_u.sum_to_size(u.shape),
            g_w.sum_to_size(w.shape),
            g_b.sum_to_size(b.shape),
            None,
            None,
            None,
        )


def planar_forward_fused(
    z: Tensor,
    u: Tensor,
    w: Tensor,
    b: Tensor,
    scaled_offset: bool,
    slack: float,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor]:
    return PlanarFunction.apply(z, u, w, b, scaled_offset, slack, shift)
