"""NICE additive coupling (Dinh, Krueger & Bengio 2014), the paper's volume-preserving baseline.

    z'_a = z_a,   z'_b = z_b + m(z_a [, c])        log|det| = 0

The halves alternate with the layer index, so a stack of two mixes every coordinate. The coupling
network m has global weights; when amortised it also reads a per-example context vector c (the
layer's "parameters", produced by the encoder), so the same class serves both experiments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowvae.flows.base import Flow, context_stress_params
from flowvae.flows.registry import FLOWS


def coupling_halves(dim: int, index: int) -> tuple[slice, slice]:
    """(conditioning, transformed) slices; which half is transformed alternates with index."""
    cut = dim // 2
    first, second = slice(0, cut), slice(cut, dim)
    return (first, second) if index % 2 == 0 else (second, first)


def coupling_mlp(n_in: int, hidden: list[int], n_out: int) -> nn.Sequential:
    """A small MLP whose last layer starts near zero, so a fresh coupling is close to identity."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    last = nn.Linear(width, n_out)
    nn.init.normal_(last.weight, std=1e-2 / math.sqrt(width))
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class Coupling(Flow):
    """Shared plumbing of coupling layers: halves, the conditioning MLP and an optional context."""

    #: outputs of the conditioning network per transformed coordinate
    outputs_per_coordinate = 1

    def __init__(
        self,
        dim: int,
        *,
        amortized: bool = False,
        index: int = 0,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        context_dim: int | None = None,
    ) -> None:
        if dim < 2:
            raise ValueError(f"{type(self).__name__} coupling needs dim >= 2, got {dim}")
        self.context_dim = (dim if context_dim is None else int(context_dim)) if amortized else 0
        super().__init__(dim, amortized=amortized, index=index)
        self.cond, self.moved = coupling_halves(dim, index)
        n_cond = self.cond.stop - self.cond.start
        n_moved = self.moved.stop - self.moved.start
        self.net = coupling_mlp(
            n_cond + self.context_dim, list(hidden), n_moved * self.outputs_per_coordinate
        )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"context": (self.context_dim,)} if self.context_dim else {}

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def conditioner(self, z: Tensor, context: Tensor | None) -> Tensor:
        x = z[:, self.cond]
        if context is not None:
            x = torch.cat([x, context.expand(z.shape[0], -1)], dim=-1)
        return self.net(x)

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        return context_stress_params(dim, batch, dtype)


@FLOWS.register("nice")
class NICE(Coupling):
    """Additive coupling: volume preserving, log-det exactly 0, exact inverse."""

    def transform(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift = self.conditioner(z, context)
        z_next = z.clone()
        z_next[:, self.moved] = z[:, self.moved] + shift
        return z_next, z.new_zeros(z.shape[0])

    def inverse_transform(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        shift = self.conditioner(y, context)
        z = y.clone()
        z[:, self.moved] = y[:, self.moved] - shift
        return z
