"""The contract between the trainer, the CLI and what is being fitted.

An experiment owns a model and its data (or target). The trainer asks it for a batch and a loss,
the CLI for an evaluation, samples and report tables; nothing outside this package needs to know
which experiment it is talking to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from flowvae.catalog import EXPERIMENTS  # noqa: F401  (where experiments register)
from flowvae.distributed import SINGLE, Shard

LOG_2PI = 1.8378770664093453


@dataclass(kw_only=True)
class EvalOptions:
    """What `flowvae eval` and `sweep` may ask for (by keyword); each experiment reads the fields
    it knows and falls back to its config for those left at None."""

    samples: int | None = None  # density: samples for KL(q‖p)
    iw_samples: int | None = None  # VAE: importance samples per image
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    max_rows: int | None = None
    psis: bool = False  # VAE: also the Pareto-smoothed -log p(x)
    progress: Callable[[int, int], None] | None = None
    shard: Shard = SINGLE


@dataclass
class ReportOptions:
    """Pictures `flowvae report` may write beside its tables (each kind draws the ones it has),
    and how to rebuild a run when a picture needs its model."""

    load: Callable[[Path], Any]
    plot: Path | None = None  # a metric against K
    figure: Path | None = None  # the fitted models themselves


@dataclass
class SampleOptions:
    n: int | None = None  # None: the experiment's default (its ``default_samples``)
    out_file: Path = Path("samples.png")
    seed: int = 0
    reconstruct: bool = False


class Experiment(Protocol):
    #: Keys of `evaluate`'s result that `flowvae eval` shows as a table, in order.
    eval_keys: ClassVar[list[str]]
    #: On the CPU, run on one thread (tiny problems, where threads only add sync overhead).
    single_thread: ClassVar[bool]
    #: The train.anneal values it understands (what β_t may weigh).
    anneals: ClassVar[tuple[str, ...]]
    #: The config sections it reads; the others are left out of the config a run writes.
    sections: ClassVar[tuple[str, ...]]
    #: The training metric the progress line shows (a key of ``loss``'s metrics, in nats) and
    #: its name there, e.g. ("neg_elbo", "−ELBO").
    progress: ClassVar[tuple[str, str]]
    #: The name of ``validate``'s score (in nats), e.g. "val KL".
    score_label: ClassVar[str]
    #: The `flowvae eval` and `flowvae sample` options it reads (others are refused).
    eval_options: ClassVar[frozenset[str]]
    sample_options: ClassVar[frozenset[str]]
    #: How many samples `flowvae sample` draws without --n.
    default_samples: ClassVar[int]
    model: nn.Module

    def __init__(self, cfg: Any, device: torch.device) -> None: ...

    @staticmethod
    def check_config(cfg: Any) -> None:
        """Refuse, with a one-line ConfigError, keys that do not apply to this experiment."""

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (each with its lr) over the trainable parameters."""

    @staticmethod
    def label(cfg: Any) -> str:
        """What is fitted (target or dataset name), for folder names and banners."""

    def batch(self, size: int) -> tuple[Tensor, ...]:
        """Fresh training inputs for one global batch (rows first; the trainer shards them)."""

    def loss(
        self, model: nn.Module, batch: tuple[Tensor, ...], beta: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The annealed objective through ``model`` (the trainer's wrapped model), and scalar
        metrics as tensors (not synced)."""

    def validate(self) -> dict[str, float]:
        """Held-out metrics; ``score`` (lower is better) selects best.pt. Empty when nothing is
        held out: then best.pt is the last checkpoint (never chosen on test data)."""

    def images(self) -> dict[str, Any]:
        """Name -> HxWx3 uint8 image for TensorBoard."""

    def evaluate(self, options: EvalOptions) -> dict[str, Any]:
        """The reported metrics of the current weights, as one JSON-able dict."""

    def sample(self, options: SampleOptions) -> None:
        """Write samples to ``options.out_file`` (.png picture or .npz arrays)."""

    def summary(self) -> dict[str, Any]:
        """What a checkpoint records about the experiment."""

    @classmethod
    def report(cls, rows: list[dict], options: ReportOptions) -> list[str]:
        """Markdown lines (tables, links to pictures) for evaluated runs of this kind."""


def anneal_beta(step: int, anneal_steps: int) -> float:
    """β_t = min(1, 0.01 + t / anneal_steps), the paper's free-energy schedule (1 when off)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, 0.01 + step / anneal_steps)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimiser updates, in the model's order."""
    return [p for p in model.parameters() if p.requires_grad]


def gaussian_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last axis."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI
