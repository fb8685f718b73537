"""Radial flow (Rezende & Mohamed 2015, eq. 14 and appendix A.2).

    f(z) = z + β h(α, r) (z - z0),   h = 1 / (α + r),   r = ‖z - z0‖
    log|det ∂f/∂z| = (D - 1) log(1 + βh) + log(1 + βh + βh'r),   h' = -h²

with α = softplus(α') + SLACK, β = -α + softplus(β') + SLACK so that β > -α (invertible).
Writing s = softplus(β') + SLACK = α + β > 0, both factors take a form free of cancellation:

    1 + βh         = (r + s) / (α + r)
    1 + βh + βh'r  = (r² + 2αr + αs) / (α + r)²

which is what :func:`radial_forward` evaluates. The inverse is a scalar root in r: ‖y - z0‖ =
r (r + s) / (α + r) is a quadratic in r with one positive root, taken in its stable form.

Near z0 the map scales distances by (r + s) / (α + r) ≈ s / α. With α = softplus(α') alone,
α' = -50 gives α ≈ 2e-22: the ball r < α (narrower than the float spacing around z0) is blown up
to the ball ‖y - z0‖ < s, so every y there has a preimage that rounds to z0 and f(f⁻¹(y)) ≠ y.
The floor α >= SLACK bounds that magnification by s / SLACK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.base import Flow
from flowvae.flows.radial_stack import radial_stack_forward
from flowvae.flows.registry import FLOWS

SLACK = 1e-6

#: Run a stack of radial layers in one pass (radial_stack.py); False runs it layer by layer
#: through the reference ops below, which is what the tests compare it against.
STACKED = True


def radial_constants(alpha_raw: Tensor, beta_raw: Tensor) -> tuple[Tensor, Tensor]:
    """(α, s) with α = softplus(α') + SLACK > 0 and s = α + β = softplus(β') + SLACK > 0, (B|1,)."""
    return F.softplus(alpha_raw[:, 0]) + SLACK, F.softplus(beta_raw[:, 0]) + SLACK


def radial_beta(alpha_raw: Tensor, beta_raw: Tensor) -> Tensor:
    """β = -α + softplus(β') + SLACK (for inspection; the maths uses α and s = α + β)."""
    alpha, s = radial_constants(alpha_raw, beta_raw)
    return s - alpha


def radial_forward(
    z: Tensor, z0: Tensor, alpha_raw: Tensor, beta_raw: Tensor
) -> tuple[Tensor, Tensor]:
    alpha, s = radial_constants(alpha_raw, beta_raw)
    diff = z - z0
    r = diff.norm(dim=-1)
    scale = (r + s) / (alpha + r)  # 1 + βh
    z_next = z0 + diff * scale.unsqueeze(-1)
    log_ar = torch.log(alpha + r)
    log_det = (z.shape[-1] - 1) * (torch.log(r + s) - log_ar) + (
        torch.log(r * r + 2.0 * alpha * r + alpha * s) - 2.0 * log_ar
    )
    return z_next, log_det


def radial_inverse(y: Tensor, z0: Tensor, alpha_raw: Tensor, beta_raw: Tensor) -> Tensor:
    alpha, s = radial_constants(alpha_raw, beta_raw)
    diff = y - z0
    r_y = diff.norm(dim=-1)
    # r² + (s - r_y) r - α r_y = 0, positive root without cancellation
    c = s - r_y
    root = torch.sqrt(c * c + 4.0 * alpha * r_y)
    r = torch.where(c > 0, 2.0 * alpha * r_y / (c + root), 0.5 * (root - c))
    return z0 + diff * ((alpha + r) / (r + s)).unsqueeze(-1)


@FLOWS.register("radial")
class Radial(Flow):
    """Radial flow: contracts or expands around a reference point z0."""

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"z0": (self.dim,), "alpha": (1,), "beta": (1,)}

    def init_param(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name == "z0":
            return torch.randn(shape)
        return torch.randn(shape) * 0.1

    def transform(
        self, z: Tensor, z0: Tensor, alpha: Tensor, beta: Tensor
    ) -> tuple[Tensor, Tensor]:
        return radial_forward(z, z0, alpha, beta)

    def inverse_transform(self, y: Tensor, z0: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        return radial_inverse(y, z0, alpha, beta)

    @classmethod
    def stack_forward(
        cls, layers: list[Flow], z: Tensor, params: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        if not STACKED:
            return None
        return radial_stack_forward(z, cls.packed_params(layers, params), SLACK)

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        cases = []
        for a, b in ((-50.0, 50.0), (-50.0, -50.0), (50.0, -50.0), (50.0, 50.0)):
            z0 = torch.randn(batch, dim, generator=gen, dtype=dtype)
            alpha = torch.full((batch, 1), a, dtype=dtype)
            beta = torch.full((batch, 1), b, dtype=dtype)
            cases.append(torch.cat([z0, alpha, beta], dim=1))
        return cases
