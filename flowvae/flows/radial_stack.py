"""K radial layers as one autograd node: four small ops per layer each way, the rest batched.

Run layer by layer, each radial layer unpacks its parameters, takes two softplus of its own and
evaluates its log-det (five logs and products) before the next layer can start, and autograd
retraces all of it backwards: some 25 small ops per layer forward and more backward. Only
diff = z - z0, r = ‖diff‖ and the update of z are sequential; so here α = softplus(α') + SLACK
and s = α + β = softplus(β') + SLACK of all K layers are one op each, the loop keeps every diff_k
and r_k in (K, B, ·) buffers, the log-dets of all layers are one set of ops on (K, B) after it,
and the backward pass is hand-written. The maths is radial.py's (its reference ops, run layer by
layer, are what the tests compare this with).

One layer, with h = (r + s)/(α + r) = 1 + β/(α + r):

    z' = z0 + h·diff,   log det = (D - 1) log h + log(h + r ∂h/∂r),   ∂h/∂r = (1 - h)/(α + r)

(the log-det written as (D - 1)(log(r + s) - log(α + r)) + log(r² + 2αr + αs) - 2 log(α + r)).
Backwards, with g = ∂L/∂z' and ∂L/∂h = gᵀdiff:

    ∂L/∂z = h·g + c·diff,   c = (∂L/∂h ∂h/∂r + ∂L/∂logdet ∂logdet/∂r)/r,   ∂L/∂z0 = g - ∂L/∂z

so a layer is one row-wise dot product, one (B,) coefficient and two (B, D) ops; every ∂L/∂z_k
is kept in a buffer, from which ∂L/∂z0 of all layers is one subtraction, and ∂L/∂α', ∂L/∂β'
come from the K dot products in a few (K, B) ops.

Shapes: z (B, D); the packed parameters [z0, α', β'] (P, K, D + 2), P = B (amortised) or 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.planar_stack import refuse_double_backward


class RadialStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, params: Tensor, slack: float):
        d, k = z.shape[-1], params.shape[1]
        z0 = params[..., :d]
        alpha = (F.softplus(params[..., d]) + slack).t()  # (K, P)
        s = (F.softplus(params[..., d + 1]) + slack).t()  # α + β > 0
        diffs = z.new_empty(k, *z.shape)  # diffs[k] = z_k - z0_k
        r = z.new_empty(k, z.shape[0], 1)
        # z' = z0 + h·diff = z + (β/(α + r))·diff: two (B, 1) ops for the factor, not three.
        beta = (s - alpha).unsqueeze(-1)
        z0_rows, d_rows, r_rows = z0.unbind(1), diffs.unbind(0), r.unbind(0)
        a_rows, b_rows = alpha.unsqueeze(-1).unbind(0), beta.unbind(0)  # (P, 1) each
        for i in range(k):
            torch.sub(z, z0_rows[i], out=d_rows[i])
            torch.linalg.vector_norm(d_rows[i], dim=-1, keepdim=True, out=r_rows[i])
            z = torch.addcmul(z, d_rows[i], b_rows[i] / (a_rows[i] + r_rows[i]))
        r = r.squeeze(-1)
        ar = alpha + r  # (K, B)
        log_ar = torch.log(ar)
        q = r * r + 2.0 * alpha * r + alpha * s
        log_det = (d - 1) * (torch.log(r + s) - log_ar) + (torch.log(q) - 2.0 * log_ar)
        ctx.save_for_backward(params, alpha, s, diffs, r, ar, q)
        return z, log_det.sum(0)

    @staticmethod
    def backward(ctx, g_y: Tensor, g_ld: Tensor):
        refuse_double_backward("radial")
        params, alpha, s, diffs, r, ar, q = ctx.saved_tensors
        k, d = diffs.shape[0], diffs.shape[-1]
        inv_ar, inv_rs, inv_q = ar.reciprocal(), (r + s).reciprocal(), q.reciprocal()
        h = (r + s) * inv_ar
        # ∂ log det / ∂r, ∂α, ∂s of every layer, (K, B)
        ld_r = (d - 1) * (inv_rs - inv_ar) + 2.0 * (r + alpha) * inv_q - 2.0 * inv_ar
        ld_a = -(d + 1) * inv_ar + (2.0 * r + s) * inv_q
        ld_s = (d - 1) * inv_rs + alpha * inv_q
        # c = ∂L/∂h · c_h + c_0; at r = 0 (z on z0) the norm passes no gradient, as autograd's.
        inv_r = r.reciprocal().masked_fill_(r == 0, 0.0)
        c_h = (1.0 - h) * inv_ar * inv_r
        c_0 = (g_ld * ld_r).mul_(inv_r)
        # gs[k] = ∂L/∂z_k (the input of layer k), gs[K] = ∂L/∂z_K
        gs = g_y.new_empty(k + 1, *g_y.shape)
        gs[k] = g_y
        g_h = torch.empty_like(r)  # ∂L/∂h_k
        c = torch.empty_like(r)
        g_rows, d_rows, gh_rows = gs.unbind(0), diffs.unbind(0), g_h.unbind(0)
        c_rows, h_cols, c_cols = c.unbind(0), h[..., None].unbind(0), c[..., None].unbind(0)
        ch_rows, c0_rows = c_h.unbind(0), c_0.unbind(0)
        for i in range(k - 1, -1, -1):
            torch.linalg.vecdot(g_rows[i + 1], d_rows[i], out=gh_rows[i])
            torch.addcmul(c0_rows[i], gh_rows[i], ch_rows[i], out=c_rows[i])
            torch.mul(g_rows[i + 1], h_cols[i], out=g_rows[i])
            g_rows[i].addcmul_(d_rows[i], c_cols[i])
        # ∂h/∂α = -h/(α + r), ∂h/∂s = 1/(α + r); softplus' = sigmoid
        g_a = (g_ld * ld_a).sub_(g_h * h * inv_ar)
        g_s = (g_ld * ld_s).addcmul_(g_h, inv_ar)
        g_z0 = gs[1:] - gs[:-1]  # (K, B, D)
        if params.shape[0] == 1:  # one set of parameters for every row: sum over the rows
            g_z0, g_a, g_s = g_z0.sum(1, keepdim=True), g_a.sum(1, True), g_s.sum(1, True)
        packed = params.new_empty(params.shape)
        packed[..., :d] = g_z0.transpose(0, 1)
        torch.mul(g_a.t(), torch.sigmoid(params[..., d]), out=packed[..., d])
        torch.mul(g_s.t(), torch.sigmoid(params[..., d + 1]), out=packed[..., d + 1])
        return gs[0], packed, None


def radial_stack_forward(z: Tensor, params: Tensor, slack: float) -> tuple[Tensor, Tensor]:
    """z_K and Σ_k log|det J_k| of K radial layers; ``params`` (B|1, K, D + 2) holds each
    layer's [z0, α', β'] as in the flat amortised layout."""
    return RadialStackFunction.apply(z, params, slack)
