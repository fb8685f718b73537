"""Affine coupling (Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR
2017), the non-volume-preserving successor of NICE.

    z'_a = z_a,   z'_b = z_b ⊙ exp(s) + t,   [s̃, t] = NN(z_a [, c])
    s = S tanh(s̃ / S)                      log|det ∂f/∂z| = Σ s

The raw log-scale s̃ is soft-bounded to (-S, S) with S = ``scale_bound`` (default 2): an
unbounded exp(s̃) is the usual way RealNVP layers blow up early in training, and a bounded scale
also keeps the exact inverse z_b = (z'_b - t) ⊙ exp(-s) well conditioned. Halves, the
conditioning MLP and the amortised context are shared with NICE (:class:`Coupling`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowvae.flows.base import context_stress_params
from flowvae.flows.nice import Coupling
from flowvae.flows.registry import FLOWS


@FLOWS.register("affine_coupling")
class AffineCoupling(Coupling):
    """RealNVP-style affine coupling with a tanh-bounded log-scale; exact inverse."""

    outputs_per_coordinate = 2

    def __init__(
        self,
        dim: int,
        *,
        amortized: bool = False,
        index: int = 0,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        context_dim: int | None = None,
        scale_bound: float = 2.0,
    ) -> None:
        if not scale_bound > 0:
            raise ValueError(f"affine_coupling needs scale_bound > 0, got {scale_bound}")
        super().__init__(
            dim, amortized=amortized, index=index, hidden=hidden, context_dim=context_dim
        )
        self.scale_bound = float(scale_bound)

    def scale_shift(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raw_s, t = self.conditioner(z, context).chunk(2, dim=-1)
        return self.scale_bound * torch.tanh(raw_s / self.scale_bound), t

    def transform(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self.scale_shift(z, context)
        z_next = z.clone()
        z_next[:, self.moved] = z[:, self.moved] * torch.exp(s) + t
        return z_next, s.sum(-1)

    def inverse_transform(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        s, t = self.scale_shift(y, context)
        z = y.clone()
        z[:, self.moved] = (y[:, self.moved] - t) * torch.exp(-s)
        return z

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_bound={self.scale_bound}"

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        return context_stress_params(dim, batch, dtype)
