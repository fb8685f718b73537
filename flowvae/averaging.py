"""A Polyak (exponential moving) average of a model's parameters.

Training moves the raw weights; validation, best.pt and ``flowvae eval`` see the average,
which sits nearer the bottom of the noisy valley that SGD-style updates bounce around in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after update ``step`` (0-based). The decay ramps up from 0.1 so
        the average does not remember the random initialisation for thousands of updates."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model``'s state dict with the averaged parameters in place of the raw ones."""
        state = model.state_dict()
        for name, value in zip(self.names, self.shadow, strict=True):
            state[name] = value.clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        torch._foreach_copy_(self.shadow, [state[name] for name in self.names])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], raw)
