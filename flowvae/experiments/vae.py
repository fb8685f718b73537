"""Experiment 2: a deep latent Gaussian model whose posterior is a flow (DLGM+NF).

The encoder maps x to the base parameters (μ, σ) *and* the flow parameters λ(x); one sample per
data point is pushed through the K flows and scored with the annealed free energy

    F^β(x) = E_q0[ log q0(z0) - Σ_k log|det J_k| - β (log p(x|z_K) + log p(z_K)) ]

(Rezende & Mohamed 2015, §3.1/§6.2). β = 1 gives the negative ELBO. With flow.amortized false
the layers keep one global λ for all images instead. p(x|z) is the likelihood the config names
(flowvae.likelihoods): Bernoulli for binarised images, the logit-normal of the paper's CIFAR-10
experiment for pixels in (0, 1).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae import flows, psis
from flowvae.distributed import gather_results
from flowvae.errors import CheckpointError
from flowvae.experiments.base import (
    EXPERIMENTS,
    EvalOptions,
    ReportOptions,
    SampleOptions,
    gaussian_log_prob,
)
from flowvae.likelihoods import LIKELIHOODS
from flowvae.likelihoods import bernoulli_log_lik as bernoulli_log_lik  # re-exported
from flowvae.nets import mlp
from flowvae.paper import PaperTable

#: Share of images with Pareto k̂ > 0.7 above which `flowvae eval` warns that the -log p(x)
#: estimate is unreliable (a few such images barely move a mean over thousands).
UNRELIABLE_SHARE = 0.01

#: Decoder rows per importance-sampling pass. On CPU, passes of a few thousand rows are as fast as
#: larger ones and avoid fresh page-faulting allocations of tens of MB per layer (measured in
#: docs/benchmarks.md); on a GPU larger passes keep the device busy.
MAX_ROWS = {"cpu": 4000, "cuda": 65536}


class FlowVAE(nn.Module):
    def __init__(
        self,
        x_dim: int,
        latent_dim: int,
        hidden: list[int],
        flow_name: str,
        k: int,
        activation: str = "maxout",
        window: int = 4,
        flow_options: dict | None = None,
        precision: str = "float32",
        likelihood: str = "bernoulli",
        amortized: bool = True,
    ) -> None:
        super().__init__()
        if precision not in ("float32", "bf16"):
            raise ValueError(f"precision must be 'float32' or 'bf16', got {precision!r}")
        self.x_dim, self.latent_dim = x_dim, latent_dim
        self.bf16 = precision == "bf16"
        self.likelihood = LIKELIHOODS.get(likelihood)()
        self.encoder = mlp(x_dim, hidden, activation, window)
        self.decoder_body = mlp(latent_dim, list(reversed(hidden)), activation, window)
        width = hidden[-1] if hidden else x_dim
        self.flow = flows.build(
            flow_name, latent_dim, k, amortized=amortized, **(flow_options or {})
        )
        self.mu = nn.Linear(width, latent_dim)
        self.sigma = nn.Linear(width, latent_dim)
        self.flow_head = nn.Linear(width, self.flow.num_params) if self.flow.num_params else None
        # One linear head: likelihood.outputs values per pixel, [logits] or [μ | log σ].
        self.decoder_out = nn.Linear(
            hidden[0] if hidden else latent_dim, self.likelihood.outputs * x_dim
        )
        if self.flow_head is not None:
            # Start the flows close to their "small parameters" regime instead of whatever a
            # wide random projection gives; the encoder grows them as they help.
            nn.init.normal_(self.flow_head.weight, std=0.01 / math.sqrt(width))
            nn.init.zeros_(self.flow_head.bias)

    def nets(self, device: torch.device):
        """The arithmetic of the encoder and decoder MLPs: bf16 autocast when asked for. Their
        outputs are cast back to float32, so flows, log-dets and densities never see bf16."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """μ, σ and the flat flow parameters λ(x) (None without flow parameters)."""
        with self.nets(x.device):
            h = self.encoder(x)
            mu, sigma = self.mu(h), self.sigma(h)
            params = self.flow_head(h) if self.flow_head is not None else None
        if self.bf16:
            mu, sigma = mu.float(), sigma.float()
            params = params.float() if params is not None else None
        return mu, F.softplus(sigma) + 1e-4, params

    def decode(self, z: Tensor) -> Tensor:
        """The parameters of p(x|z) per row: Bernoulli logits, or [μ | log σ] (logit-normal)."""
        with self.nets(z.device):
            out = self.decoder_out(self.decoder_body(z))
        return out.float() if self.bf16 else out

    def picture(self, z: Tensor) -> Tensor:
        """What p(x|z) looks like, values in [0, 1] per pixel (flowvae.likelihoods)."""
        return self.likelihood.picture(self.decode(z))

    def log_weights(
        self, x: Tensor, mu: Tensor, sigma: Tensor, params: Tensor | None, eps: Tensor
    ) -> dict[str, Tensor]:
        """log p(x|z_K), log p(z_K), log q_K(z_K) for z0 = μ + σ·eps (rows of x, mu, ... align)."""
        z0 = mu + sigma * eps
        log_q0 = gaussian_log_prob(eps) - sigma.log().sum(-1)
        z, log_det = self.flow(z0, params)
        log_px = self.likelihood.log_prob(self.decode(z), x)
        return {"log_px": log_px, "log_pz": gaussian_log_prob(z), "log_q": log_q0 - log_det}

    def forward(self, x: Tensor, eps: Tensor | None = None) -> dict[str, Tensor]:
        """One-sample terms per data point (base noise eps drawn here unless given)."""
        mu, sigma, params = self.encode(x)
        return self.log_weights(x, mu, sigma, params, torch.randn_like(mu) if eps is None else eps)


def kl_warmup_free_energy(terms: dict[str, Tensor], beta: float) -> Tensor:
    """-log p(x|z_K) + β (log q_K(z_K) - log p(z_K)): β weighs only the KL term, so the decoder
    is trained at full strength from the first update (train.anneal = kl). β = 1 gives the
    negative ELBO, as the paper's schedule does."""
    return beta * (terms["log_q"] - terms["log_pz"]) - terms["log_px"]


def free_energy(terms: dict[str, Tensor], beta: float) -> Tensor:
    """Annealed free energy per data point; β = 1 is the negative ELBO."""
    return terms["log_q"] - beta * (terms["log_px"] + terms["log_pz"])


#: train.anneal -> the annealed objective it names
ANNEALED = {"joint": free_energy, "kl": kl_warmup_free_energy}


def negative_elbo(model: FlowVAE, x: Tensor, batch_size: int = 1000) -> Tensor:
    """-ELBO per image (one sample each)."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        terms = model(x[start : start + batch_size])
        out.append(free_energy(terms, 1.0))
    return torch.cat(out)


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
    model: FlowVAE,
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
    model: FlowVAE, data: Tensor, options: EvalOptions, samples: int
) -> dict[str, Tensor]:
    """Per image of ``data`` (float64, CPU): -log p(x) ("nll"), -ELBO ("neg_elbo") and the
    weight diagnostics of ``weight_diagnostics``.

    Images are taken in chunks of max_rows // S; under torchrun each process evaluates every
    world-th chunk and the per-image results are gathered, equal to a single process's.
    """
    max_rows = options.max_rows or MAX_ROWS.get(data.device.type, MAX_ROWS["cpu"])
    shard = options.shard
    per_chunk = max(1, max_rows // samples)
    starts = list(range(0, data.shape[0], per_chunk))
    results: dict[int, dict[str, Tensor]] = {}
    with torch.inference_mode():
        for i, lo in enumerate(starts[shard.rank :: shard.world]):
            gen = chunk_generator(options.seed, lo // per_chunk, data.device)
            est = importance_nll(model, data[lo : lo + per_chunk], samples, max_rows, gen)
            per_image = {"nll": est.nll, "neg_elbo": est.neg_elbo, **weight_diagnostics(est.log_w)}
            results[lo] = {key: v.double().cpu() for key, v in per_image.items()}
            if options.progress is not None:
                done = min((i + 1) * per_chunk * shard.world, data.shape[0])
                options.progress(done, data.shape[0])
    results = gather_results(results, shard)
    return {key: torch.cat([results[lo][key] for lo in starts]) for key in results[starts[0]]}


@EXPERIMENTS.register("vae")
class VAEExperiment:
    eval_keys = ["dataset", "split", "flow", "k", "neg_elbo", "nll", "nll_stderr", "nll_psis"]
    eval_keys += ["iw_samples", "examples", "khat_over_0_5", "khat_over_0_7", "khat_max"]
    eval_keys += ["ess_median", "ess_fraction_median", "likelihood"]
    eval_keys += ["bits_per_dim", "bits_per_dim_stderr", "bits_per_dim_8bit"]
    single_thread = False
    anneals = tuple(ANNEALED)
    unused = ("target",)

    def __init__(self, cfg, device: torch.device) -> None:
        from flowvae.data import DATASETS

        self.cfg = cfg
        self.device = device
        entry = DATASETS.get(cfg.data.name)
        #: model.likelihood, or the dataset's default when the config leaves it null
        self.likelihood = cfg.model.likelihood or entry.likelihood
        self.data = entry.load(
            root=cfg.data.root,
            valid_size=cfg.data.valid_size,
            binarize=cfg.data.binarize,
            seed=cfg.seed,
            device=device,
            download=cfg.data.download,
            pixels=LIKELIHOODS.get(self.likelihood).pixels,
            eps=cfg.data.eps,
        )
        m = cfg.model
        self.model = FlowVAE(
            x_dim=self.data.test.shape[1],
            latent_dim=m.latent_dim,
            hidden=list(m.hidden),
            flow_name=cfg.flow.name,
            k=cfg.flow.k,
            activation=m.activation,
            window=m.maxout_window,
            flow_options=cfg.flow.options,
            precision=m.precision,
            likelihood=self.likelihood,
            amortized=cfg.flow.amortized,
        ).to(device)

    @staticmethod
    def label(cfg) -> str:
        return cfg.data.name

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        # Every rank draws the same global batch and noise and keeps its shard (distributed.py).
        x = self.data.train_batch(size)
        return x, torch.randn(x.shape[0], self.model.latent_dim, device=x.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], beta: float):
        terms = model(*batch)
        loss = ANNEALED[self.cfg.train.anneal](terms, beta).mean()
        with torch.no_grad():
            metrics = {
                "neg_elbo": free_energy(terms, 1.0).mean(),
                "recon": -terms["log_px"].mean(),
                "kl": (terms["log_q"] - terms["log_pz"]).mean(),
            }
        return loss, metrics

    def validate(self) -> dict[str, float]:
        x = self.data.valid if self.data.valid.shape[0] else self.data.test[:1000]
        with torch.inference_mode():
            neg_elbo = float(negative_elbo(self.model, x, self.cfg.eval.batch_size).mean())
        return {"score": neg_elbo, "neg_elbo": neg_elbo}

    def images(self) -> dict:
        from flowvae.plots import image_grid

        with torch.inference_mode():
            z = torch.randn(64, self.model.latent_dim, device=self.device)
            pictures = self.model.picture(z)
        images = {"samples": image_grid(self.as_images(pictures).cpu(), nrow=8)}
        if self.model.latent_dim == 2:  # q_K beside the true posterior (flowvae.posterior)
            from flowvae.posterior_figure import tensorboard_view

            images["posterior"] = tensorboard_view(self)
        return images

    def as_images(self, rows: Tensor) -> Tensor:
        """(N, D) pixel rows -> (N, H, W) or (N, C, H, W) images of the dataset's shape."""
        return rows.reshape(-1, *self.data.image_shape)

    def evaluate(self, options: EvalOptions) -> dict[str, Any]:
        """-ELBO and importance-sampled -log p(x) with exactly S samples per image."""
        samples = options.iw_samples or self.cfg.eval.iw_samples
        data = getattr(self.data, options.split)
        if options.limit is not None:
            data = data[: options.limit]
        if data.shape[0] == 0:
            raise CheckpointError(
                f"the {options.split} split is empty (data.valid_size = 0?) — use --split test"
            )
        start = time.perf_counter()
        per_image = sharded_importance_nll(self.model, data, options, samples)
        nll, nelbo = per_image["nll"], per_image["neg_elbo"]
        n = nll.numel()
        nll_stderr = float(nll.std()) / math.sqrt(n) if n > 1 else float("nan")
        diagnostics = psis.summary(per_image["khat"], per_image["ess"], samples)
        if options.psis:
            diagnostics["nll_psis"] = float(per_image["nll_psis"].mean())
        if diagnostics["khat_over_0_7"] > UNRELIABLE_SHARE:
            diagnostics["warning"] = (
                f"{diagnostics['khat_over_0_7']:.1%} of images have Pareto k̂ > 0.7: their "
                "importance weights are too heavy-tailed for S samples to be trusted, and "
                "-log p(x) is likely overestimated — raise --iw-samples, or train a better q"
            )
        return {
            "kind": "vae",
            "dataset": self.cfg.data.name,
            "split": options.split,
            "flow": self.cfg.flow.name,
            "k": self.cfg.flow.k,
            "neg_elbo": float(nelbo.mean()),
            "nll": float(nll.mean()),
            "nll_stderr": nll_stderr,
            "iw_samples": samples,
            "examples": n,
            **diagnostics,
            "likelihood": self.likelihood,
            # continuous pixels: bits/dim too (flowvae.data.pixels says in which space)
            **self.data.pixels.metrics(float(nll.mean()), nll_stderr, self.data.dim),
            # every image's estimate, in the split's order: runs scored on the same images
            # are compared image by image (paired_table), far tighter than by their means
            "nll_per_image": [round(v, 4) for v in nll.tolist()],
            "seconds": time.perf_counter() - start,
        }

    def sample(self, options: SampleOptions) -> None:
        from flowvae.plots import image_grid, save_png

        model, n = self.model, options.n
        torch.manual_seed(options.seed)
        with torch.inference_mode():
            if options.reconstruct:
                x = self.data.test[:n]
                mu, sigma, params = model.encode(x)
                z, _ = model.flow(mu + sigma * torch.randn_like(mu), params)
                pictures = model.picture(z)
                arrays = {"x": x.cpu().numpy(), "reconstruction": pictures.cpu().numpy()}
                # pairs side by side: original, reconstruction, original, ...
                tiles, nrow = self.as_images(torch.stack([x, pictures], dim=1)), 16
            else:
                z = torch.randn(n, model.latent_dim, device=self.device)
                pictures = model.picture(z)
                name = model.likelihood.picture_name  # "probs" (Bernoulli), "median" (logit-normal)
                arrays = {"z": z.cpu().numpy(), name: pictures.cpu().numpy()}
                tiles, nrow = self.as_images(pictures), max(1, int(np.ceil(np.sqrt(n))))
        if options.out_file.suffix.lower() == ".npz":
            np.savez(options.out_file, **arrays)
        else:
            save_png(image_grid(tiles.cpu(), nrow=nrow), options.out_file)

    def summary(self) -> dict:
        return {"kind": "vae", "dataset": self.cfg.data.name, "likelihood": self.likelihood}

    @classmethod
    def report(cls, rows: list[dict], options: ReportOptions) -> list[str]:
        """One section per dataset and likelihood, each with its paper table and -log p(x) plot
        (one plot: --plot itself; several: --plot's name with -<dataset>-<likelihood>)."""
        from flowvae.data import DATASETS
        from flowvae.plots import nll_plot

        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            entry = DATASETS.get(r["dataset"])
            groups.setdefault((r["dataset"], r.get("likelihood", entry.likelihood)), []).append(r)
        lines: list[str] = []
        for (dataset, likelihood), group in sorted(groups.items()):
            entry = DATASETS.get(dataset)
            title = entry.title if likelihood == entry.likelihood else f"{dataset}, {likelihood}"
            lines += [f"## Flow VAE on {title}", "", nll_table(group, entry.paper), ""]
            if paired := paired_table(group):
                lines += [PAIRED_INTRO, "", paired, ""]
            if options.plot is not None:
                plot = options.plot
                if len(groups) > 1:
                    plot = plot.with_name(f"{plot.stem}-{dataset}-{likelihood}{plot.suffix}")
                nll_plot(group, plot, entry.paper)
                lines += [f"![-log p(x) against K]({plot.name})", ""]
        return lines


#: Report columns of continuous data (their eval.json has them), after -log p(x).
BITS_COLUMNS = [("bits_per_dim", "bits/dim"), ("bits_per_dim_8bit", "bits/dim (8-bit)")]


def nll_table(rows: list[dict], paper: PaperTable | None = None) -> str:
    """One row per run: the bound, the estimate, whether its importance weights can be trusted
    (share of images with Pareto k̂ > 0.7, median ESS of S), the value of the paper's table
    ``paper`` (if any), the cost. Continuous data adds bits/dim, over
    x ∈ (ε, 1 − ε) and over the dequantised 256-level pixels (flowvae.likelihoods)."""
    from flowvae.paper import flow_rank

    bits = [(key, head) for key, head in BITS_COLUMNS if all(key in r for r in rows)]
    # sweep --iw-samples 200 --iw-samples 5000: one more estimate per extra S
    extra = sorted({int(s) for r in rows for s in r.get("by_samples", {})})
    head = ["run", "flow", "K", "split", "−ELBO", "−log p(x) ± s.e.", *(h for _, h in bits)]
    head += ["IS samples"]
    head += [f"−log p(x), S = {s:,}" for s in extra]
    head += ["k̂ > 0.7", "median ESS", "paper −log p(x)", "steps", "train min", "hardware"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---", "---:", "---", *["---:"] * (len(head) - 5), "---"]) + "|",
    ]
    for r in sorted(rows, key=lambda r: (*flow_rank(r["flow"]), r["k"])):
        seconds = r["info"].get("train_seconds")
        khat = f"{r['khat_over_0_7']:.1%}" if "khat_over_0_7" in r else "—"
        ess = f"{r['ess_median']:.1f}" if "ess_median" in r else "—"
        cells = [
            Path(r["run"]).name if "run" in r else "—",
            "none" if r["k"] == 0 else r["flow"],
            str(r["k"]),
            r.get("split", "test"),
            f"{r['neg_elbo']:.2f}",
            f"{r['nll']:.2f} ± {r['nll_stderr']:.2f}",
            *(f"{r[key]:.3f}" for key, _ in bits),
            str(r["iw_samples"]),
            *(_estimate(r.get("by_samples", {}).get(str(s))) for s in extra),
            khat,
            ess,
            # the paper's numbers are test numbers: a validation run is not set beside them
            paper.cell(r["flow"], r["k"]) if paper and r.get("split", "test") == "test" else "—",
            str(r["info"].get("steps", r.get("step", "?"))),
            f"{seconds / 60:.1f}" if seconds is not None else "?",
            str(r["info"].get("hardware", "?")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_INTRO = (
    "Differences in −log p(x) between runs scored on the same images, image by image "
    "(positive: the second run is better), ± the standard error of the per-image differences:"
)


def paired_table(rows: list[dict]) -> str | None:
    """Each flow against the flow-free model and its own next-shorter K, and the families
    against each other at equal K, from the per-image estimates of runs on the same images.

    Two runs scored on the same images share most of their spread (some images are hard for
    every model), so the standard error of the per-image differences is a fraction of the
    runs' own standard errors: it says whether one K beats another, which theirs cannot."""
    lines = []
    for split, label, a, b in _pairs(rows):
        x, y = torch.tensor(a["nll_per_image"]), torch.tensor(b["nll_per_image"])
        if x.shape != y.shape or a["iw_samples"] != b["iw_samples"]:
            continue
        diff = (x - y).double()
        mean, stderr = float(diff.mean()), float(diff.std()) / math.sqrt(diff.numel())
        lines.append(
            f"| {label} | {split} | {a['iw_samples']} | {mean:+.2f} ± {stderr:.2f} "
            f"| {mean / stderr:+.1f} |"
        )
    if not lines:
        return None
    head = "| comparison | split | IS samples | difference (nats) | difference / s.e. |"
    return "\n".join([head, "|---|---|---:|---:|---:|", *lines])


def _pairs(rows: list[dict]) -> list[tuple[str, str, dict, dict]]:
    """(split, label, run, the run it is compared with) for paired_table."""
    from flowvae.paper import flow_rank

    found: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        flow = "none" if r["k"] == 0 else r["flow"]
        if "nll_per_image" in r:
            found.setdefault((r.get("split", "test"), flow, r["k"]), []).append(r)
    # A (flow, K) evaluated more than once (seeds, a longer preview) has no single partner.
    runs = {key: group[0] for key, group in found.items() if len(group) == 1}
    pairs = []
    for split in sorted({s for s, *_ in runs}):
        at = {(f, k): r for (s, f, k), r in runs.items() if s == split}
        flows = sorted({f for f, _ in at if f != "none"}, key=flow_rank)
        for flow in flows:
            chain = [at[("none", 0)]] if ("none", 0) in at else []
            chain += [at[key] for key in sorted(key for key in at if key[0] == flow)]
            for a, b in itertools.pairwise(chain):
                pairs.append((split, f"{flow}: K = {a['k']} → {b['k']}", a, b))
        for first, second in itertools.combinations(flows, 2):
            for k in sorted(k for f, k in at if f == first and (second, k) in at):
                pairs.append(
                    (split, f"K = {k}: {second} → {first}", at[(second, k)], at[(first, k)])
                )
    return pairs


def _estimate(result: dict | None) -> str:
    return f"{result['nll']:.2f} ± {result['nll_stderr']:.2f}" if result else "—"
