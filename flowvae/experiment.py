"""What is being fitted: the contract between the training loop and an experiment.

An experiment owns a model and knows how to draw a training loss, how to validate, and what to
show in TensorBoard. ``EXPERIMENTS`` maps the config's ``experiment`` key to a builder.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from flowvae.registry import Registry


class Experiment(Protocol):
    model: nn.Module

    def train_loss(self, step: int, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The annealed objective for one update, and scalar metrics (tensors, not synced)."""

    def validate(self) -> dict[str, float]:
        """Held-out metrics; ``score`` (lower is better) selects best.pt."""

    def images(self) -> dict[str, Any]:
        """Name -> HxWx3 uint8 image for TensorBoard."""


EXPERIMENTS: Registry = Registry("experiment")


def anneal_beta(step: int, anneal_steps: int) -> float:
    """β_t = min(1, 0.01 + t / anneal_steps), the paper's free-energy schedule (1 when off)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, 0.01 + step / anneal_steps)


def gaussian_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last axis."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * 1.8378770664093453


def build_experiment(cfg: Any, device: torch.device) -> Experiment:
    # Import here so that each experiment module registers itself on first use.
    from flowvae import density, vae  # noqa: F401

    return EXPERIMENTS.get(cfg.experiment)(cfg, device)
