"""Importance-sampled -log p(x) of a latent-variable model, and how far its weights can be
trusted.

    -log p(x) ≈ -log (1/S Σ_s p(x, z_s) / q(z_s|x)),   z_s ~ q(z|x)

with exactly S samples per image, processed in chunks so any S fits in memory; each image's
log-weights also give its Pareto k̂, effective sample size and Pareto-smoothed estimate
(flowvae.psis). The model is anything with ``encode(x) -> (μ, σ, λ)``,
``log_weights(x, μ, σ, λ, eps)`` and ``latent_dim`` (flowvae.experiments.vae.FlowVAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from flowvae import psis
from flowvae.distributed import SINGLE, Shard, gather_results

__all__ = [
    "MAX_ROWS",
    "ImportanceSample",
    "chunk_generator",
    "importance_nll",
    "sharded_importance_nll",
    "weight_diagnostics",
]

#: Decoder rows per importance-sampling pass. On CPU, passes of a few thousand rows are as fast as
#: larger ones and avoid fresh page-faulting allocations of tens of MB per layer (measured in
#: docs/benchmarks.md); on a GPU larger passes keep the device busy.
MAX_ROWS = {"cpu": 4000, "cuda": 65536}


def _repeat_rows(t: Tensor | None, s: int) -> Tensor | None:
    """(n, d) -> (n*s, d) with each row repeated s times in a row."""
    if t is None:
        return None
    n, d = t.shape
    return t.unsqueeze(1).expand(n, s, d).reshape(n * s, d)


class ImportanceSample(NamedTuple):
    nll: Tensor  # (n,) -log (1/S Σ_s w_s)
    neg_elbo: Tensor  # (n,) -(1/S) Σ_s log w_s
    log_w: Tensor  # (n, S) the log-weights themselves, for diagnostics


def importance_nll(
    model: nn.Module,
    x: Tensor,
    samples: int,
    max_rows: int = 4000,
    generator: torch.Generator | None = None,
) -> ImportanceSample:
    """Per-image -log p(x) ≈ -log (1/S Σ_s p(x, z_s)/q(z_s|x)) with exactly S samples, and -ELBO.

    The encoder runs once per image; samples are processed in chunks of at most ``max_rows``
    decoder rows and combined with logsumexp, so any S fits in memory.
    """
    n = x.shape[0]
    mu, sigma, params = model.encode(x)
    per_chunk = max(1, min(samples, max_rows // max(1, n)))
    running = None
    elbo_sum = torch.zeros(n, device=x.device, dtype=mu.dtype)
    chunks = []
    done = 0
    while done < samples:
        s = min(per_chunk, samples - done)
        eps = torch.randn(
            n * s, model.latent_dim, device=x.device, dtype=mu.dtype, generator=generator
        )
        mu_r, sigma_r = (_repeat_rows(t, s) for t in (mu, sigma))
        # One image per chunk (S > max_rows / 2): its flow parameters go in as one row that every
        # sample shares, not S copies, so a deep planar stack builds its coupling matrices once
        # rather than per sample (S = 5,000 at K = 80 in half the time).
        params_r = params if n == 1 else _repeat_rows(params, s)
        terms = model.log_weights(x.unsqueeze(1), mu_r, sigma_r, params_r, eps)
        log_w = (terms["log_px"] + terms["log_pz"] - terms["log_q"]).view(n, s)
        chunks.append(log_w)
        elbo_sum += log_w.sum(1)
        chunk_lse = torch.logsumexp(log_w, dim=1)
        running = chunk_lse if running is None else torch.logaddexp(running, chunk_lse)
        done += s
    nll = -(running - math.log(samples))
    return ImportanceSample(nll, -elbo_sum / samples, torch.cat(chunks, dim=1))


def weight_diagnostics(log_w: Tensor) -> dict[str, Tensor]:
    """Per image: the Pareto k̂ and effective sample size of its importance weights, and the
    Pareto-smoothed -log p(x) (float64)."""
    log_w = log_w.double()
    smoothed, khat = psis.psis(log_w)
    log_s = math.log(log_w.shape[1])
    nll_psis = -(torch.logsumexp(smoothed, dim=1) - log_s)
    return {"khat": khat, "ess": psis.ess(log_w), "nll_psis": nll_psis}


def chunk_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    """The noise stream of one evaluation chunk: fixed by (seed, chunk index) alone, so the
    result does not depend on how chunks are spread over processes."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + chunk)


def sharded_importance_nll(
    model: nn.Module,
    data: Tensor,
    samples: int,
    *,
    seed: int = 0,
    max_rows: int | None = None,
    shard: Shard = SINGLE,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """Per image of ``data`` (float64, CPU): -log p(x) ("nll"), -ELBO ("neg_elbo") and the
    weight diagnostics of ``weight_diagnostics``.

    Images are taken in chunks of max_rows // S (default: MAX_ROWS of the device); under
    torchrun each process evaluates every world-th chunk and the per-image results are
    gathered, equal to a single process's. ``progress(done, total)`` is called after each chunk.
    """
    max_rows = max_rows or MAX_ROWS.get(data.device.type, MAX_ROWS["cpu"])
    per_chunk = max(1, max_rows // samples)
    starts = list(range(0, data.shape[0], per_chunk))
    results: dict[int, dict[str, Tensor]] = {}
    with torch.inference_mode():
        for i, lo in enumerate(starts[shard.rank :: shard.world]):
            gen = chunk_generator(seed, lo // per_chunk, data.device)
            est = importance_nll(model, data[lo : lo + per_chunk], samples, max_rows, gen)
            per_image = {"nll": est.nll, "neg_elbo": est.neg_elbo, **weight_diagnostics(est.log_w)}
            results[lo] = {key: v.double().cpu() for key, v in per_image.items()}
            if progress is not None:
                done = min((i + 1) * per_chunk * shard.world, data.shape[0])
                progress(done, data.shape[0])
    results = gather_results(results, shard)
    return {key: torch.cat([results[lo][key] for lo in starts]) for key in results[starts[0]]}
