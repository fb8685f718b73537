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
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae import flows, psis
from flowvae.catalog import EXPERIMENTS
from flowvae.data import DATASETS
from flowvae.errors import ConfigError, DataError
from flowvae.experiments.base import (
    EvalOptions,
    ReportOptions,
    SampleOptions,
    gaussian_log_prob,
    trainable,
)
from flowvae.importance import sharded_importance_nll
from flowvae.likelihoods import LIKELIHOODS
from flowvae.nets import mlp
from flowvae.tables import PAIRED_INTRO, nll_table, paired_table

#: Share of images with Pareto k̂ > 0.7 above which `flowvae eval` warns that the -log p(x)
#: estimate is unreliable (a few such images barely move a mean over thousands).
UNRELIABLE_SHARE = 0.01


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


def flow_head_groups(model: FlowVAE, lr: float, flow_lr_scale: float) -> list[dict[str, Any]]:
    """The trainable parameters at ``lr``, the encoder's flow head at ``lr · flow_lr_scale``
    (one group when the scale is 1)."""
    params = trainable(model)
    if flow_lr_scale == 1.0:
        return [{"params": params, "lr": lr}]
    ids = {id(p) for p in model.flow_head.parameters()}  # check_config says there is one
    return [
        {"params": [p for p in params if id(p) not in ids], "lr": lr},
        {"params": [p for p in params if id(p) in ids], "lr": lr * flow_lr_scale},
    ]


def negative_elbo(model: FlowVAE, x: Tensor, batch_size: int = 1000) -> Tensor:
    """-ELBO per image (one sample each)."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        terms = model(x[start : start + batch_size])
        out.append(free_energy(terms, 1.0))
    return torch.cat(out)


@EXPERIMENTS.register("vae")
class VAEExperiment:
    eval_keys = ["dataset", "split", "flow", "k", "neg_elbo", "nll", "nll_stderr", "nll_psis"]
    eval_keys += ["iw_samples", "examples", "khat_over_0_5", "khat_over_0_7", "khat_max"]
    eval_keys += ["ess_median", "ess_fraction_median", "likelihood"]
    eval_keys += ["bits_per_dim", "bits_per_dim_stderr", "bits_per_dim_8bit"]
    single_thread = False
    anneals = tuple(ANNEALED)
    sections = ("data", "flow", "model", "train", "eval")
    progress = ("neg_elbo", "−ELBO")
    score_label = "val −ELBO"
    eval_options = frozenset(
        {"--iw-samples", "--split", "--limit", "--data-root", "--psis", "--max-rows"}
        | {"--seed", "--device", "--json"}
    )
    sample_options = frozenset({"--n", "--reconstruct", "--data-root", "--seed", "--device"})
    sample_options |= {"--out"}
    default_samples = 64  # an 8 × 8 grid: thumbnails big enough to see

    def __init__(self, cfg, device: torch.device) -> None:
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
    def check_config(cfg) -> None:
        amortised_head = cfg.flow.amortized and cfg.flow.k > 0
        if cfg.train.flow_lr_scale != 1.0 and not amortised_head:
            raise ConfigError(
                "config key train.flow_lr_scale scales the encoder's flow head, which only a VAE "
                "with an amortised flow (flow.amortized: true, flow.k > 0) has — remove the key"
            )
        if cfg.model.base == "uniform":  # a bounded base is for density runs
            raise ConfigError(
                "config key model.base = 'uniform' applies to density runs only (a VAE's q0 is "
                "its encoder's Gaussian) — remove the key"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        """The parameters at lr, and the encoder's flow head at lr · train.flow_lr_scale.

        Adam moves every head output by about lr per update whatever K is, so the map of K
        layers moves about K times as far as one layer's: the scale gives a deep stack a
        smaller step."""
        return flow_head_groups(self.model, self.cfg.train.lr, self.cfg.train.flow_lr_scale)

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
        x = self.data.valid
        if x.shape[0] == 0:  # data.valid_size: 0 holds nothing out; the test set chooses nothing
            return {}
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
            raise DataError(
                f"the {options.split} split is empty (data.valid_size = 0?) — use --split test"
            )
        start = time.perf_counter()
        per_image = sharded_importance_nll(
            self.model,
            data,
            samples,
            seed=options.seed,
            max_rows=options.max_rows,
            shard=options.shard,
            progress=options.progress,
        )
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

        model, n = self.model, options.n or self.default_samples
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
