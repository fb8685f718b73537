"""Rebuild an experiment from a checkpoint, and evaluate or sample it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowvae import checkpoint, experiments
from flowvae.config import Config, from_dict
from flowvae.device import resolve_device
from flowvae.errors import CheckpointError, ConfigError
from flowvae.experiments import EvalOptions


@dataclass
class LoadedRun:
    cfg: Config
    experiment: Any
    ckpt: dict
    device: torch.device


def load_run(
    path: str | Path,
    device: str = "auto",
    data_root: str | None = None,
    check: Callable[[str], None] | None = None,
) -> LoadedRun:
    """The checkpoint's experiment with its weights. ``check(experiment name)`` runs before the
    experiment is built (and its data loaded), e.g. to refuse options it does not read."""
    ckpt = checkpoint.load(path)
    try:
        cfg = from_dict(ckpt["config"])
    except (ConfigError, KeyError, TypeError) as exc:  # a config this version cannot read
        raise CheckpointError(f"{path}: its stored config is not valid here ({exc})") from None
    if check is not None:
        check(cfg.experiment)
    if data_root is not None:
        cfg.data.root = data_root
    dev = resolve_device(device)
    cfg.device = dev.type
    torch.manual_seed(cfg.seed)
    experiment = experiments.build(cfg, dev)
    try:
        experiment.model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the stored config ({first})") from None
    experiment.model.eval()
    return LoadedRun(cfg, experiment, ckpt, dev)


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a checkpoint lies in (RUN/checkpoints/NAME.pt beside RUN/config.yaml),
    where `flowvae eval` records its result; None for a checkpoint kept elsewhere."""
    path = Path(path)
    run_dir = path.parent.parent
    if path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        return run_dir
    return None


def evaluate(run: LoadedRun, options: EvalOptions) -> dict[str, Any]:
    """The experiment's evaluation of the checkpoint, with the step it was saved at."""
    result = run.experiment.evaluate(options)
    seconds = result.pop("seconds")
    return {**result, "step": int(run.ckpt["step"]), "seconds": seconds}
