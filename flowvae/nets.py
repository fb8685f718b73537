"""Multi-layer perceptrons for the VAE encoder and decoder, maxout included."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Maxout(nn.Module):
    """Linear map to ``width * window`` units, then the max over each window of ``window``."""

    def __init__(self, n_in: int, width: int, window: int) -> None:
        super().__init__()
        self.width, self.window = width, window
        self.linear = nn.Linear(n_in, width * window)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        # max_pool1d over windows of consecutive units is the same max as
        # view(..., width, window).amax(-1), but 3-6x faster on CPU for the tall batches of
        # importance sampling (amax's strided reduction copies and refills its output).
        pooled = F.max_pool1d(y.reshape(-1, 1, y.shape[-1]), self.window)
        return pooled.view(*y.shape[:-1], self.width)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(n_in: int, hidden: list[int], activation: str = "relu", window: int = 4) -> nn.Sequential:
    """Hidden layers only (the caller adds its own output heads); width of the result = hidden[-1]."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        if activation == "maxout":
            layers.append(Maxout(width, h, window))
        else:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    return nn.Sequential(*layers)
