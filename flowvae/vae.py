"""Experiment 2: a deep latent Gaussian model whose posterior is an amortised flow (DLGM+NF).

The encoder maps x to the base parameters (μ, σ) *and* the flow parameters λ(x); one sample per
data point is pushed through the K flows and scored with the annealed free energy

    F^β(x) = E_q0[ log q0(z0) - Σ_k log|det J_k| - β (log p(x|z_K) + log p(z_K)) ]

(Rezende & Mohamed 2015, §3.1/§6.2). β = 1 gives the negative ELBO.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae import flows
from flowvae.distributed import SINGLE
from flowvae.experiment import EXPERIMENTS, gaussian_log_prob
from flowvae.nets import mlp

LOG_2PI = math.log(2 * math.pi)


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
    ) -> None:
        super().__init__()
        if precision not in ("float32", "bf16"):
            raise ValueError(f"precision must be 'float32' or 'bf16', got {precision!r}")
        self.x_dim, self.latent_dim = x_dim, latent_dim
        self.bf16 = precision == "bf16"
        self.encoder = mlp(x_dim, hidden, activation, window)
        self.decoder_body = mlp(latent_dim, list(reversed(hidden)), activation, window)
        width = hidden[-1] if hidden else x_dim
        self.flow = flows.build(flow_name, latent_dim, k, amortized=True, **(flow_options or {}))
        self.mu = nn.Linear(width, latent_dim)
        self.sigma = nn.Linear(width, latent_dim)
        self.flow_head = nn.Linear(width, self.flow.num_params) if self.flow.num_params else None
        self.decoder_out = nn.Linear(hidden[0] if hidden else latent_dim, x_dim)
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
        """Bernoulli logits of p(x|z)."""
        with self.nets(z.device):
            logits = self.decoder_out(self.decoder_body(z))
        return logits.float() if self.bf16 else logits

    def log_weights(
        self, x: Tensor, mu: Tensor, sigma: Tensor, params: Tensor | None, eps: Tensor
    ) -> dict[str, Tensor]:
        """log p(x|z_K), log p(z_K), log q_K(z_K) for z0 = μ + σ·eps (rows of x, mu, ... align)."""
        z0 = mu + sigma * eps
        log_q0 = gaussian_log_prob(eps) - sigma.log().sum(-1)
        z, log_det = self.flow(z0, params)
        log_px = bernoulli_log_lik(self.decode(z), x)
        return {"log_px": log_px, "log_pz": gaussian_log_prob(z), "log_q": log_q0 - log_det}

    def forward(self, x: Tensor, eps: Tensor | None = None) -> dict[str, Tensor]:
        """One-sample terms per data point (base noise eps drawn here unless given)."""
        mu, sigma, params = self.encode(x)
        return self.log_weights(x, mu, sigma, params, torch.randn_like(mu) if eps is None else eps)


def bernoulli_log_lik(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) = Σ x·l - softplus(l) from logits (stable, no clamping). x may be (n, 1, d)
    against logits (n·s, d), s consecutive rows per image, so importance samples never copy x."""
    if x.shape == logits.shape:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    grouped = logits.view(x.shape[0], -1, x.shape[-1])  # (n, s, d) rows of image i together
    return ((grouped * x).sum(-1) - F.softplus(grouped).sum(-1)).reshape(-1)


def free_energy(terms: dict[str, Tensor], beta: float) -> Tensor:
    """Annealed free energy per data point; β = 1 is the negative ELBO."""
    return terms["log_q"] - beta * (terms["log_px"] + terms["log_pz"])


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


def importance_nll(
    model: FlowVAE,
    x: Tensor,
    samples: int,
    max_rows: int = 4000,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-image -log p(x) ≈ -log (1/S Σ_s p(x, z_s)/q(z_s|x)) with exactly S samples, and -ELBO.

    The encoder runs once per image; samples are processed in chunks of at most ``max_rows``
    decoder rows and combined with logsumexp, so any S fits in memory.
    """
    n = x.shape[0]
    mu, sigma, params = model.encode(x)
    per_chunk = max(1, min(samples, max_rows // max(1, n)))
    running = None
    elbo_sum = torch.zeros(n, device=x.device, dtype=mu.dtype)
    done = 0
    while done < samples:
        s = min(per_chunk, samples - done)

        eps = torch.randn(
            n * s, model.latent_dim, device=x.device, dtype=mu.dtype, generator=generator
        )
        mu_r, sigma_r, params_r = (_repeat_rows(t, s) for t in (mu, sigma, params))
        terms = model.log_weights(x.unsqueeze(1), mu_r, sigma_r, params_r, eps)
        log_w = (terms["log_px"] + terms["log_pz"] - terms["log_q"]).view(n, s)
        elbo_sum += log_w.sum(1)
        chunk_lse = torch.logsumexp(log_w, dim=1)
        running = chunk_lse if running is None else torch.logaddexp(running, chunk_lse)
        done += s
    nll = -(running - math.log(samples))
    return nll, -elbo_sum / samples


class VAEExperiment:
    def __init__(self, cfg, device: torch.device) -> None:
        from flowvae.data import DATASETS

        self.cfg = cfg
        self.device = device
        self.data = DATASETS.get(cfg.data.name)(
            root=cfg.data.root,
            valid_size=cfg.data.valid_size,
            binarize=cfg.data.binarize,
            seed=cfg.seed,
            device=device,
            download=cfg.data.download,
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
        ).to(device)
        # The trainer swaps in a DistributedDataParallel wrapper and this rank's shard.
        self.forward_model, self.shard = self.model, SINGLE

    def train_loss(self, step: int, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        # Draw the global batch and noise on every rank, keep this rank's shard (see distributed.py).
        x = self.data.train_batch(self.cfg.train.batch_size)
        eps = torch.randn(x.shape[0], self.model.latent_dim, device=x.device)
        terms = self.forward_model(self.shard.take(x), self.shard.take(eps))
        loss = free_energy(terms, beta).mean()
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
            neg_elbo = float(negative_elbo(self.model, x, self.cfg.eval.batch_size * 10).mean())
        return {"score": neg_elbo, "neg_elbo": neg_elbo}

    def images(self) -> dict:
        from flowvae.plots import image_grid

        with torch.inference_mode():
            z = torch.randn(64, self.model.latent_dim, device=self.device)
            probs = torch.sigmoid(self.model.decode(z))
        return {"samples": image_grid(probs.view(-1, 28, 28).cpu(), nrow=8)}

    def summary(self) -> dict:
        return {"kind": "vae", "dataset": self.cfg.data.name}


EXPERIMENTS.register("vae")(VAEExperiment)
