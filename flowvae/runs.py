"""Rebuild an experiment from a checkpoint, and evaluate or sample it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowvae import checkpoint
from flowvae.config import Config, from_dict
from flowvae.device import resolve_device
from flowvae.errors import CheckpointError
from flowvae.experiment import build_experiment


@dataclass
class LoadedRun:
    cfg: Config
    experiment: Any
    ckpt: dict
    device: torch.device


def load_run(path: str | Path, device: str = "auto", data_root: str | None = None) -> LoadedRun:
    ckpt = checkpoint.load(path)
    try:
        cfg = from_dict(ckpt["config"])
    except Exception as exc:  # a config this version cannot read
        raise CheckpointError(f"{path}: its stored config is not valid here ({exc})") from None
    if data_root is not None:
        cfg.data.root = data_root
    dev = resolve_device(device)
    cfg.device = dev.type
    torch.manual_seed(cfg.seed)
    experiment = build_experiment(cfg, dev)
    try:
        experiment.model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the stored config ({first})") from None
    experiment.model.eval()
    return LoadedRun(cfg, experiment, ckpt, dev)


def evaluate_density(run: LoadedRun, samples: int, seed: int = 0) -> dict[str, Any]:
    from flowvae.density import kl_estimate

    torch.manual_seed(seed)
    start = time.perf_counter()
    stats = kl_estimate(run.experiment.model, run.experiment.target, samples)
    return {
        "kind": "density",
        "target": run.cfg.target.name,
        "flow": run.cfg.flow.name,
        "k": run.cfg.flow.k,
        "kl": stats["kl"],
        "kl_stderr": stats["kl_stderr"],
        "ess_fraction": stats["ess_fraction"],
        "mean_weight": stats["mean_weight"],
        "log_z": stats["log_z"],
        "samples": samples,
        "step": int(run.ckpt["step"]),
        "seconds": time.perf_counter() - start,
    }


def evaluate_vae(
    run: LoadedRun,
    iw_samples: int,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    max_rows: int = 4000,
    progress=None,
) -> dict[str, Any]:
    """-ELBO and importance-sampled -log p(x) with exactly ``iw_samples`` samples per image."""
    from flowvae.vae import importance_nll

    data = getattr(run.experiment.data, split)
    if limit is not None:
        data = data[:limit]
    if data.shape[0] == 0:
        raise CheckpointError(
            f"the {split} split is empty (data.valid_size = 0?) — use --split test"
        )
    torch.manual_seed(seed)
    per_chunk = max(1, max_rows // iw_samples)
    nll, nelbo = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, data.shape[0], per_chunk):
            a, b = importance_nll(
                run.experiment.model, data[lo : lo + per_chunk], iw_samples, max_rows
            )
            nll.append(a.double().cpu())
            nelbo.append(b.double().cpu())
            if progress is not None:
                progress(min(lo + per_chunk, data.shape[0]), data.shape[0])
    nll_t, nelbo_t = torch.cat(nll), torch.cat(nelbo)
    n = nll_t.numel()
    return {
        "kind": "vae",
        "dataset": run.cfg.data.name,
        "split": split,
        "flow": run.cfg.flow.name,
        "k": run.cfg.flow.k,
        "neg_elbo": float(nelbo_t.mean()),
        "nll": float(nll_t.mean()),
        "nll_stderr": float(nll_t.std()) / math.sqrt(n) if n > 1 else float("nan"),
        "iw_samples": iw_samples,
        "examples": n,
        "step": int(run.ckpt["step"]),
        "seconds": time.perf_counter() - start,
    }
