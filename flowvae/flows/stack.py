"""A stack of K flow layers: z_K = f_K ∘ … ∘ f_1(z_0), log q_K(z_K) = log q_0(z_0) - Σ log|det J_k|."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowvae.flows.base import Flow


class FlowStack(nn.Module):
    """K layers applied in order; amortised parameters are split by each layer's declared size."""

    def __init__(self, layers: list[Flow], dim: int, amortized: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dim = int(dim)
        self.amortized = bool(amortized)
        self.sizes = [layer.num_params for layer in layers]
        # A family may run a homogeneous stack as one unit (Flow.stack_forward).
        kinds = {type(layer) for layer in layers}
        self._family = kinds.pop() if len(kinds) == 1 else None

    @property
    def num_params(self) -> int:
        """Per-example parameter count the stack consumes when amortised (0 when global)."""
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.layers)

    def check(self, params: Tensor | None) -> None:
        """Raise a ValueError unless ``params`` fits this stack (amortised: shape (B, P), or
        (1, P) shared by every row of z)."""
        if not self.amortized or self.num_params == 0:
            return
        if params is None:
            raise ValueError(
                f"this amortised stack needs parameters of shape (B, {self.num_params})"
            )
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(
                f"expected flow parameters of shape (B, {self.num_params}), got {tuple(params.shape)}"
            )

    def split(self, params: Tensor | None) -> list[Tensor | None]:
        self.check(params)
        if not self.amortized or self.num_params == 0:
            return [None] * len(self.layers)
        return list(torch.split(params, self.sizes, dim=1))

    def forward(self, z: Tensor, params: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}), got {tuple(z.shape)}")
        if self._family is not None:
            self.check(params)
            fused = self._family.stack_forward(self.layers, z, params)
            if fused is not None:
                return fused
        log_det = z.new_zeros(z.shape[0])
        for layer, p in zip(self.layers, self.split(params)):
            z, ld = layer(z, p)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, y: Tensor, params: Tensor | None = None) -> Tensor:
        chunks = self.split(params)
        for layer, p in zip(reversed(self.layers), reversed(chunks)):
            y = layer.inverse(y, p)
        return y

    def as_transform(self, params: Tensor | None = None, cache_size: int = 1):
        """This stack as a ``torch.distributions.Transform`` (flowvae.flows.transform), with
        an amortised stack's (B, P) ``params`` bound to it."""
        from flowvae.flows.transform import FlowTransform

        return FlowTransform(self, params, cache_size)

    def inverse_with_log_det(
        self, y: Tensor, params: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """z_0 = f⁻¹(y) and Σ log|det J_k| along the forward path from z_0 (for scoring y)."""
        z0 = self.inverse(y, params)
        _, log_det = self.forward(z0, params)
        return z0, log_det
