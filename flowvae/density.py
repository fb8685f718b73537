"""Experiment 1: fit q_K(z) = flow(q_0) to an unnormalised 2-D energy by annealed reverse KL.

loss = E_{z0 ~ q0}[ log q_K(z_K) + β_t U(z_K) ]      (KL(q_K ‖ p) - log Z when β = 1)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowvae import flows
from flowvae.distributed import SINGLE
from flowvae.experiment import EXPERIMENTS, gaussian_log_prob
from flowvae.targets import TARGETS, Target


class FlowDensity(nn.Module):
    """q_K: a Gaussian base (standard or learnable diagonal) pushed through K global flows."""

    def __init__(self, flow: flows.FlowStack, dim: int = 2, learn_base: bool = True) -> None:
        super().__init__()
        self.flow = flow
        self.dim = dim
        self.mu = nn.Parameter(torch.zeros(dim), requires_grad=learn_base)
        self.log_sigma = nn.Parameter(torch.zeros(dim), requires_grad=learn_base)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """n samples z_K and their exact log q_K(z_K)."""
        return self(torch.randn(n, self.dim, device=self.mu.device, dtype=self.mu.dtype))

    def forward(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """z_K and log q_K(z_K) for base noise eps ~ N(0, I)."""
        z0 = self.mu + self.log_sigma.exp() * eps
        log_q0 = gaussian_log_prob(eps) - self.log_sigma.sum()
        z, log_det = self.flow(z0)
        return z, log_q0 - log_det

    def log_prob(self, z: Tensor) -> Tensor:
        """log q_K at arbitrary points, through the flow's inverse."""
        z0, log_det = self.flow.inverse_with_log_det(z)
        eps = (z0 - self.mu) / self.log_sigma.exp()
        return gaussian_log_prob(eps) - self.log_sigma.sum() - log_det


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


class DensityExperiment:
    single_thread = True

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg = cfg
        self.target: Target = TARGETS.get(cfg.target.name)
        stack = flows.build(cfg.flow.name, 2, cfg.flow.k, amortized=False, **cfg.flow.options)
        self.model = FlowDensity(stack, dim=2, learn_base=cfg.model.base == "diagonal").to(device)
        self.device = device
        # The trainer swaps in a DistributedDataParallel wrapper and this rank's shard.
        self.forward_model, self.shard = self.model, SINGLE

    def train_loss(self, step: int, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        eps = torch.randn(self.cfg.train.batch_size, 2, device=self.device)
        z, log_q = self.forward_model(self.shard.take(eps))
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

    def summary(self) -> dict:
        return {"kind": "density", "target": self.cfg.target.name}


EXPERIMENTS.register("density")(DensityExperiment)
