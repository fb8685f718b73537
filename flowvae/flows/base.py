"""The flow interface shared by every family.

A flow layer maps a batch ``z`` of shape (B, D) to ``(z', log|det dz'/dz|)`` with the log-det of
shape (B,). Its parameters are either *global* (``nn.Parameter`` s of the module, as in the 2-D
density experiment) or *amortised*: one flat vector per example, shape (B, P), produced by an
encoder (the paper's VAE). One class serves both: a subclass declares the shapes it needs and
writes the maths once over tensors with a leading batch axis of size B (amortised) or 1 (global).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Flow(nn.Module):
    """Base class of an invertible layer with a tractable log-determinant.

    Subclasses implement :meth:`param_shapes`, :meth:`transform` and :meth:`inverse_transform`.
    ``transform(z, **params)`` receives every declared parameter with a leading batch axis
    (B when amortised, 1 when global) and returns ``(z_next, log_abs_det)``.
    """

    #: True for families whose inverse is exact (analytic), False for a numerical root.
    exact_inverse: bool = True
    #: True when det ∂f/∂z > 0 everywhere; a family that may flip orientation (a reflection)
    #: says so with False, and then only |det| is defined by ``log_abs_det``.
    orientation_preserving: bool = True

    def __init__(self, dim: int, *, amortized: bool = False, index: int = 0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"flow dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.amortized = bool(amortized)
        self.index = int(index)
        self._shapes = dict(self.param_shapes())
        if not self.amortized:
            for name, shape in self.global_shapes().items():
                self.register_parameter(name, nn.Parameter(self.init_param(name, shape)))

    # -- what a subclass declares -------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shapes of the parameters consumed when amortised."""
        raise NotImplementedError

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters the module owns when global (default: the same ones)."""
        return self.param_shapes()

    def init_param(self, name: str, shape: tuple[int, ...]) -> Tensor:  # noqa: ARG002
        """Initial value of a global parameter: small, so a fresh stack is close to identity."""
        return torch.randn(shape) * (0.1 / math.sqrt(max(1, self.dim)))

    def transform(self, z: Tensor, **params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_transform(self, y: Tensor, **params: Tensor) -> Tensor:
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Per-example parameter count consumed when amortised; 0 for a global layer."""
        if not self.amortized:
            return 0
        return sum(math.prod(s) for s in self._shapes.values())

    def unpack(self, params: Tensor | None) -> dict[str, Tensor]:
        """Split a flat (B, P) vector into named (B, *shape) views, or expose globals as (1, ...)."""
        if not self.amortized:
            if params is not None and params.shape[-1] != 0:
                raise ValueError("a global flow layer takes no per-example parameters")
            return {name: getattr(self, name).unsqueeze(0) for name in self.global_shapes()}
        if params is None:
            raise ValueError(
                f"amortised {type(self).__name__} needs per-example parameters of size "
                f"{self.num_params}"
            )
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(
                f"{type(self).__name__} expects parameters of shape (B, {self.num_params}), "
                f"got {tuple(params.shape)}"
            )
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape in self._shapes.items():
            size = math.prod(shape)
            out[name] = params[:, offset : offset + size].reshape(params.shape[0], *shape)
            offset += size
        return out

    @staticmethod
    def packed_params(layers: list[Flow], params: Tensor | None) -> Tensor:
        """A homogeneous stack's parameters as one (P, K, width) tensor in the flat amortised
        layout: amortised, the (B, K·width) ``params`` as they are; global, one cat of every
        layer's own parameters in order (one autograd node, whose backward is one split)."""
        k = len(layers)
        if layers[0].amortized:
            return params.reshape(params.shape[0], k, -1)
        names = tuple(layers[0].global_shapes())
        return torch.cat([x._parameters[name] for x in layers for name in names]).view(1, k, -1)

    def forward(self, z: Tensor, params: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, **self.unpack(params))

    def inverse(self, y: Tensor, params: Tensor | None = None) -> Tensor:
        return self.inverse_transform(y, **self.unpack(params))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, amortized={self.amortized}"

    @classmethod
    def stack_forward(
        cls,
        layers: list[Flow],  # noqa: ARG003  (the interface: families with a fast path use these)
        z: Tensor,  # noqa: ARG003
        params: Tensor | None,  # noqa: ARG003
    ) -> tuple[Tensor, Tensor] | None:
        """Optional fast path for a stack of layers of this class: ``(z_K, Σ log|det|)`` for
        all of them at once, or None to run them one by one (the default)."""
        return None

    # -- hard cases for the test suite ----------------------------------------------------------
    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        """Raw amortised parameter vectors at the edge of the family's parameterisation.

        Each entry has shape (batch, P) for a layer of this class with ``index=0``. The shared
        test suite checks log-dets, invertibility and finiteness on them without knowing the
        family; families with constrained parameters override this with their worst cases.
        """
        layer = cls(dim, amortized=True)
        p = layer.num_params
        gen = torch.Generator().manual_seed(1234)
        return [
            50.0 * torch.randn(batch, p, generator=gen, dtype=dtype),
            -50.0 * torch.rand(batch, p, generator=gen, dtype=dtype),
        ]


def context_stress_params(width: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
    """Hard per-example context vectors for flows whose amortised input is a context:
    huge random values and saturating constants of both signs."""
    gen = torch.Generator().manual_seed(0)
    return [
        1e3 * torch.randn(batch, width, generator=gen, dtype=dtype),
        torch.full((batch, width), 50.0, dtype=dtype),
        torch.full((batch, width), -50.0, dtype=dtype),
    ]


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise inner product over the last axis, broadcasting the batch axis."""
    return (a * b).sum(-1)
