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
from flowvae.distributed import SINGLE, Shard, gather_results
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


#: Decoder rows per importance-sampling pass. On CPU, passes of a few thousand rows are as fast as
#: larger ones and avoid fresh page-faulting allocations of tens of MB per layer (measured in
#: docs/benchmarks.md); on a GPU larger passes keep the device busy.
MAX_ROWS = {"cpu": 4000, "cuda": 65536}


def chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    """The noise stream of one evaluation chunk: fixed by (seed, chunk index) alone, so the
    result does not depend on how chunks are spread over processes."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + chunk)


def evaluate_vae(
    run: LoadedRun,
    iw_samples: int,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    max_rows: int | None = None,
    progress=None,
    shard: Shard = SINGLE,
) -> dict[str, Any]:
    """-ELBO and importance-sampled -log p(x) with exactly ``iw_samples`` samples per image.

    Images are taken in chunks; under torchrun each process evaluates every ``world``-th chunk
    and rank 0 gathers the per-image results, which equal a single process's exactly.
    """
    from flowvae.vae import importance_nll

    data = getattr(run.experiment.data, split)
    if limit is not None:
        data = data[:limit]
    if data.shape[0] == 0:
        raise CheckpointError(
            f"the {split} split is empty (data.valid_size = 0?) — use --split test"
        )
    if max_rows is None:
        max_rows = MAX_ROWS.get(run.device.type, MAX_ROWS["cpu"])
    per_chunk = max(1, max_rows // iw_samples)
    starts = list(range(0, data.shape[0], per_chunk))
    mine = starts[shard.rank :: shard.world]
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for i, lo in enumerate(mine):
            gen = chunk_generator(seed, lo // per_chunk, run.device)
            a, b = importance_nll(
                run.experiment.model, data[lo : lo + per_chunk], iw_samples, max_rows, gen
            )
            results[lo] = (a.double().cpu(), b.double().cpu())
            if progress is not None:
                progress(min((i + 1) * per_chunk * shard.world, data.shape[0]), data.shape[0])
    results = gather_results(results, shard)
    nll = [results[lo][0] for lo in starts]
    nelbo = [results[lo][1] for lo in starts]
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
