"""Experiment 1: fit q_K(z) = flow(q_0) to an unnormalised 2-D energy by annealed reverse KL.

loss = E_{z0 ~ q0}[ log q_K(z_K) + β_t U(z_K) ]      (KL(q_K ‖ p) - log Z when β = 1)
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowvae import flows
from flowvae.bases import BASES
from flowvae.catalog import EXPERIMENTS
from flowvae.errors import ConfigError
from flowvae.experiments.base import (
    EvalOptions,
    ReportOptions,
    SampleOptions,
    trainable,
)
from flowvae.targets import TARGETS, Target


class FlowDensity(nn.Module):
    """q_K: a base q_0 (flowvae.bases: standard, diagonal or uniform) pushed through K global
    flows. The base is z_0 = μ + σ·ε with ε from the base's noise density."""

    def __init__(self, flow: flows.FlowStack, dim: int = 2, base: str = "diagonal") -> None:
        super().__init__()
        self.flow = flow
        self.dim = dim
        self.base = BASES.get(base)
        learn = self.base.learnable
        self.mu = nn.Parameter(torch.zeros(dim), requires_grad=learn)
        log_scale = torch.full((dim,), math.log(self.base.scale))
        self.log_sigma = nn.Parameter(log_scale, requires_grad=learn)

    def noise(self, n: int) -> Tensor:
        """n draws of the base's standard noise ε."""
        return self.base.draw(n, self.dim, self.mu.device, self.mu.dtype)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """n samples z_K and their exact log q_K(z_K)."""
        return self(self.noise(n))

    def forward(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """z_K and log q_K(z_K) for base noise eps (N(0, I) or U([-1, 1]^D))."""
        z0 = self.mu + self.log_sigma.exp() * eps
        log_q0 = self.base.noise_log_prob(eps) - self.log_sigma.sum()
        z, log_det = self.flow(z0)
        return z, log_q0 - log_det

    def log_prob(self, z: Tensor) -> Tensor:
        """log q_K at arbitrary points, through the flow's inverse (-inf off a bounded base's
        support)."""
        z0, log_det = self.flow.inverse_with_log_det(z)
        eps = (z0 - self.mu) / self.log_sigma.exp()
        return self.base.noise_log_prob(eps) - self.log_sigma.sum() - log_det


def kl_estimate(model: FlowDensity, target: Target, n: int, chunk: int = 65536) -> dict[str, float]:
    """KL(q‖p) = E_q[log q + U] + log Z with its standard error, and the ESS fraction of p/q."""
    log_z = target.log_z
    values = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            z, log_q = model.sample(min(chunk, n - start))
            values.append((log_q + target.energy(z)).double())
    d = torch.cat(values)  # log q - log p̃ per sample
    kl = float(d.mean()) + log_z
    stderr = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    log_w = -(d + log_z)  # log p/q with the exact normaliser
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / n
    mean_w = float(torch.exp(torch.logsumexp(log_w, 0) - math.log(n)))
    return {
        "kl": kl,
        "kl_stderr": stderr,
        "ess_fraction": ess,
        "mean_weight": mean_w,
        "log_z": log_z,
    }


@EXPERIMENTS.register("density")
class DensityExperiment:
    eval_keys = ["target", "flow", "k", "kl", "kl_stderr", "ess_fraction", "mean_weight", "log_z"]
    eval_keys += ["samples"]
    single_thread = True
    anneals = ("joint",)  # an energy has no likelihood term to keep out of the annealing
    sections = ("target", "flow", "model", "train", "eval")
    progress = ("kl_estimate", "KL")
    score_label = "val KL"
    eval_options = frozenset({"--samples", "--seed", "--device", "--json"})
    sample_options = frozenset({"--n", "--seed", "--device", "--out"})
    default_samples = 10000

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.target: Target = TARGETS.get(cfg.target.name)
        stack = flows.build(cfg.flow.name, 2, cfg.flow.k, amortized=False, **cfg.flow.options)
        self.model = FlowDensity(stack, dim=2, base=cfg.model.base).to(device)
        self.device = device

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.train.flow_lr_scale != 1.0:
            raise ConfigError(
                "config key train.flow_lr_scale scales the flow parameters an encoder produces, "
                "which only a VAE with an amortised flow has, not a density fit — remove the key"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": trainable(self.model), "lr": self.cfg.train.lr}]

    @staticmethod
    def label(cfg) -> str:
        return cfg.target.name

    def batch(self, size: int) -> tuple[Tensor]:
        return (self.model.noise(size),)

    def loss(self, model: nn.Module, batch: tuple[Tensor], beta: float):
        z, log_q = model(batch[0])
        energy = self.target.energy(z)
        loss = (log_q + beta * energy).mean()
        kl = (log_q + energy).mean().detach() + self.target.log_z
        return loss, {"kl_estimate": kl}

    def validate(self) -> dict[str, float]:
        stats = kl_estimate(self.model, self.target, self.cfg.eval.valid_samples)
        return {"score": stats["kl"], **stats}

    def images(self) -> dict:
        from flowvae.plots import density_image

        return {"density": density_image(self.model, self.target)}

    def evaluate(self, options: EvalOptions) -> dict[str, Any]:
        samples = options.samples or self.cfg.eval.samples
        torch.manual_seed(options.seed)
        start = time.perf_counter()
        stats = kl_estimate(self.model, self.target, samples)
        return {
            "kind": "density",
            "target": self.cfg.target.name,
            "flow": self.cfg.flow.name,
            "k": self.cfg.flow.k,
            **stats,
            "samples": samples,
            "seconds": time.perf_counter() - start,
        }

    def sample(self, options: SampleOptions) -> None:
        torch.manual_seed(options.seed)
        if options.out_file.suffix.lower() == ".npz":
            with torch.no_grad():
                z, log_q = self.model.sample(options.n or self.default_samples)
            np.savez(
                options.out_file, z=z.cpu().double().numpy(), log_q=log_q.cpu().double().numpy()
            )
            return
        from flowvae.plots import density_figure, save_figure

        title = f"{self.cfg.flow.name} K={self.cfg.flow.k}"
        save_figure(density_figure(self.model, self.target, title=title), options.out_file)

    def summary(self) -> dict:
        return {"kind": "density", "target": self.cfg.target.name}

    @classmethod
    def report(cls, rows: list[dict], options: ReportOptions) -> list[str]:
        from flowvae.plots import figure3_grid

        lines = ["## Density matching: KL(q‖p) in nats (± standard error)", "", kl_table(rows), ""]
        if options.figure is not None:
            models = {
                (r["target"], r["flow"], r["k"]): options.load(
                    Path(r["run"]) / "checkpoints" / "best.pt"
                ).experiment.model
                for r in rows
            }
            figure3_grid(rows, models, options.figure)
            lines += [f"![Figure 3 grid]({options.figure.name})", ""]
        return lines


def kl_table(rows: list[dict]) -> str:
    """Targets (rows) × (flow, K) (columns) of KL ± standard error; with several seeds of a cell,
    each seed's KL in seed order, separated by slashes."""
    from flowvae.paper import flow_rank

    ks = sorted({r["k"] for r in rows})
    families = sorted({r["flow"] for r in rows}, key=flow_rank)
    targets = sorted({r["target"] for r in rows})
    cells: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r.get("config", {}).get("seed", 0)):
        cells.setdefault((r["target"], r["flow"], r["k"]), []).append(r)
    header = "| target | " + " | ".join(f"{f} K={k}" for f in families for k in ks) + " |"
    lines = [header, "|---|" + "---:|" * (len(families) * len(ks))]
    for t in targets:
        row = [_kl_cell(cells.get((t, f, k), [])) for f in families for k in ks]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _kl_cell(runs: list[dict]) -> str:
    if not runs:
        return "—"
    if len(runs) == 1:
        return f"{runs[0]['kl']:.4f} ± {runs[0]['kl_stderr']:.4f}"
    # four decimals: the good fits sit at 0.001-0.005 nats, where three would hide the ordering in K
    return " / ".join(f"{r['kl']:.4f}" for r in runs)
