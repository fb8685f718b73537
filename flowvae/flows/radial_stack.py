"""K radial layers in one pass: every layer's constants at once, the log-dets after the loop.

Run layer by layer, each radial layer unpacks its parameters, takes two softplus of its own and
evaluates its log-det (five logs and products) before the next layer can start: some 25 small
ops per layer forward and more backward. Only diff = z - z0, r = ‖diff‖ and the update of z are
sequential; so here α = softplus(α') + SLACK and s = softplus(β') + SLACK are computed for all K
layers in one op each, the loop keeps r of every layer, and the log-dets of all layers are one
set of ops on (B, K) afterwards. The maths is radial.py's (its reference ops, run layer by layer,
are what the tests compare this with); autograd differentiates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def radial_stack_forward(
    z: Tensor, z0s: list[Tensor], alpha_raw: Tensor, beta_raw: Tensor, slack: float
) -> tuple[Tensor, Tensor]:
    """z_K and Σ_k log|det J_k| of K radial layers.

    ``z0s``: the K reference points, each (B|1, D) or (D,); ``alpha_raw``, ``beta_raw``: the raw
    α', β' of every layer, (B|1, K) or (K,).
    """
    alpha = F.softplus(alpha_raw) + slack
    s = F.softplus(beta_raw) + slack  # α + β > 0
    rs = []
    for z0, a, s_k in zip(z0s, alpha.unbind(-1), s.unbind(-1), strict=True):
        diff = z - z0
        r = torch.linalg.vector_norm(diff, dim=-1)
        rs.append(r)
        z = torch.addcmul(z0, diff, ((r + s_k) / (a + r)).unsqueeze(-1))  # z0 + (1 + βh)·diff
    r = torch.stack(rs, dim=-1)  # (B, K)
    log_ar = torch.log(alpha + r)
    log_det = (z.shape[-1] - 1) * (torch.log(r + s) - log_ar) + (
        torch.log(r * r + 2.0 * alpha * r + alpha * s) - 2.0 * log_ar
    )
    return z, log_det.sum(-1)
