"""Householder flow (Tomczak & Welling 2016, "Improving variational auto-encoders using
Householder flow", arXiv 1611.09630).

    f(z) = (I - 2 v vᵀ / ‖v‖²) z        log|det ∂f/∂z| = 0,   f⁻¹ = f

A reflection is volume preserving; a stack of them rotates a diagonal Gaussian into a
full-covariance one. The map depends on v only through its direction, so v is first divided by
max|vᵢ|: that keeps ‖v‖² away from underflow when v is tiny (1e-20 in float32) or overflow when
it is huge. An exactly zero v cannot define a direction; it gives the identity, not NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowvae.flows.base import Flow, batch_dot
from flowvae.flows.registry import FLOWS


def unit_direction(v: Tensor) -> Tensor:
    """v / max|vᵢ| over the last axis: same direction, norm in [1, √D] (or exactly 0)."""
    scale = v.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    return v / scale


def reflect(z: Tensor, v: Tensor) -> Tensor:
    """(I - 2 v vᵀ/‖v‖²) z for z (..., D) and v broadcastable to it; zero v gives z."""
    u = unit_direction(v)
    u_sq = batch_dot(u, u).clamp_min(torch.finfo(v.dtype).tiny)
    return z - (2.0 * batch_dot(u, z) / u_sq).unsqueeze(-1) * u


@FLOWS.register("householder")
class Householder(Flow):
    """One Householder reflection: volume preserving and its own inverse."""

    #: det = -1 (a reflection), or +1 for the v = 0 identity
    orientation_preserving = False

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"v": (self.dim,)}

    def init_param(self, name: str, shape: tuple[int, ...]) -> Tensor:  # noqa: ARG002
        # Only the direction matters; a norm near 1 keeps gradients (which scale as 1/‖v‖) sane.
        return torch.randn(shape) / self.dim**0.5

    def transform(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return reflect(z, v), z.new_zeros(z.shape[0])

    def inverse_transform(self, y: Tensor, v: Tensor) -> Tensor:
        return reflect(y, v)

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        cases = []
        for scale in (1e-8, 1e-20, 1e3):
            v = torch.randn(batch, dim, generator=gen, dtype=dtype)
            cases.append(scale * v / v.norm(dim=1, keepdim=True))
        # one dominant coordinate: nearly a reflection of a single axis
        v = 1e-6 * torch.randn(batch, dim, generator=gen, dtype=dtype)
        v[:, 0] = 50.0
        cases.append(v)
        return cases
