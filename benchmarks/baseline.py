"""A plain, single-file PyTorch version of the paper's models, for timing flowvae against.

Rezende & Mohamed (2015), "Variational Inference with Normalizing Flows", written the simple way
and independently of flowvae's code (nothing here imports flowvae):

* DLGM+NF on binarised MNIST: maxout-4 MLP encoder 784-400-400 with heads μ, softplus σ and the
  amortised planar parameters (u, w, b per layer, all from one Linear head); K planar layers; a
  maxout-4 decoder 40-400-400-784 with Bernoulli logits. Loss: the annealed free energy with one
  sample, β_t = min(1, 0.01 + t/anneal_steps). Adam, lr 1e-3, batch 100, dynamic binarisation
  with ``torch.bernoulli`` on a batch gathered from the uint8 training images.
* Planar layers with the paper's invertibility fix û = u + (m(wᵀu) - wᵀu) w/‖w‖²,
  m(x) = -1 + softplus(x), and log|det| = log|1 + ûᵀψ|, ψ = tanh'(wᵀz + b) w, differentiated by
  plain autograd.
* Importance-sampled -log p(x): a for-loop over images, S samples each, logsumexp.
* Density matching (the paper's experiment 1): K global planar layers on a learnable diagonal
  Gaussian fitted to exp(-U1) by annealed reverse KL.

``make_baseline_step(k, train_uint8)`` returns a callable doing one full update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class Maxout(nn.Module):
    def __init__(self, n_in, width, pieces=4):
        super().__init__()
        self.width, self.pieces = width, pieces
        self.linear = nn.Linear(n_in, width * pieces)

    def forward(self, x):
        y = self.linear(x)
        return y.view(x.shape[0], self.width, self.pieces).max(dim=-1).values


def planar(z, u, w, b):
    """One planar layer: z + û tanh(wᵀz + b) and log|1 + ûᵀψ|. u, w: (B|1, D), b: (B|1, 1)."""
    wu = (w * u).sum(-1, keepdim=True)
    m = -1 + F.softplus(wu)
    u_hat = u + (m - wu) * w / (w * w).sum(-1, keepdim=True)
    t = torch.tanh((w * z).sum(-1, keepdim=True) + b)
    psi = (1 - t**2) * w
    log_det = torch.log(torch.abs(1 + (psi * u_hat).sum(-1)) + 1e-8)
    return z + u_hat * t, log_det


def log_normal(z):
    """log N(z; 0, I), summed over the last axis."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


class BaselineVAE(nn.Module):
    def __init__(self, k, x_dim=784, hidden=400, latent=40):
        super().__init__()
        self.k, self.latent = k, latent
        self.encoder = nn.Sequential(Maxout(x_dim, hidden), Maxout(hidden, hidden))
        self.mu = nn.Linear(hidden, latent)
        self.sigma = nn.Linear(hidden, latent)
        self.flow = nn.Linear(hidden, k * (2 * latent + 1)) if k > 0 else None
        self.decoder = nn.Sequential(
            Maxout(latent, hidden), Maxout(hidden, hidden), nn.Linear(hidden, x_dim)
        )

    def encode(self, x):
        h = self.encoder(x)
        flow = self.flow(h).view(x.shape[0], self.k, -1) if self.flow is not None else None
        return self.mu(h), F.softplus(self.sigma(h)), flow

    def log_weights(self, x, mu, sigma, flow):
        """log p(x|z_K) + log p(z_K) - log q_K(z_K) for one sample per row."""
        eps = torch.randn_like(mu)
        z = mu + sigma * eps
        log_q = log_normal(eps) - torch.log(sigma).sum(-1)
        d = self.latent
        for i in range(self.k):
            p = flow[:, i]
            z, log_det = planar(z, p[:, :d], p[:, d : 2 * d], p[:, 2 * d :])
            log_q = log_q - log_det
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return log_px, log_normal(z), log_q

    def free_energy(self, x, beta):
        log_px, log_pz, log_q = self.log_weights(x, *self.encode(x))
        return (log_q - beta * (log_px + log_pz)).mean()


def make_baseline_step(k, train_uint8, batch_size=100, lr=1e-3, anneal_steps=5000):
    """A callable doing one Adam update of a fresh BaselineVAE with K planar layers.

    ``train_uint8``: (N, 784) uint8 intensities 0..255; the model lives on its device. The
    callable returns the loss tensor (not synced); ``.model`` and ``.optimizer`` are attached.
    """
    model = BaselineVAE(k).to(train_uint8.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    t = 0

    def step():
        nonlocal t
        idx = torch.randint(0, train_uint8.shape[0], (batch_size,), device=train_uint8.device)
        x = torch.bernoulli(train_uint8[idx].float() / 255)
        beta = min(1.0, 0.01 + t / anneal_steps)
        loss = model.free_energy(x, beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t += 1
        return loss

    step.model, step.optimizer = model, optimizer
    return step


@torch.no_grad()
def baseline_importance_nll(model, images, samples):
    """-log p(x) ≈ -log mean_s p(x, z_s)/q(z_s|x) per image: one image at a time, S samples."""
    out = []
    for x in images:
        x = x.unsqueeze(0)
        mu, sigma, flow = model.encode(x)
        expand = [t.expand(samples, *t.shape[1:]) for t in (x, mu, sigma)]
        flow = flow.expand(samples, *flow.shape[1:]) if flow is not None else None
        log_px, log_pz, log_q = model.log_weights(*expand, flow)
        out.append(math.log(samples) - torch.logsumexp(log_px + log_pz - log_q, 0))
    return torch.stack(out)


def u1(z):
    """The paper's U1 energy (Table 1)."""
    r = torch.sqrt(z[:, 0] ** 2 + z[:, 1] ** 2)
    a = -0.5 * ((z[:, 0] - 2) / 0.6) ** 2
    b = -0.5 * ((z[:, 0] + 2) / 0.6) ** 2
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(a, b)


class BaselineDensity(nn.Module):
    """q_K: a learnable diagonal Gaussian pushed through K planar layers with global parameters."""

    def __init__(self, k, dim=2):
        super().__init__()
        self.dim = dim
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))
        self.u = nn.Parameter(0.1 * torch.randn(k, dim))
        self.w = nn.Parameter(0.1 * torch.randn(k, dim))
        self.b = nn.Parameter(torch.zeros(k, 1))

    def sample(self, n):
        eps = torch.randn(n, self.dim, device=self.mu.device)
        z = self.mu + torch.exp(self.log_sigma) * eps
        log_q = log_normal(eps) - self.log_sigma.sum()
        for i in range(self.u.shape[0]):
            z, log_det = planar(z, self.u[i : i + 1], self.w[i : i + 1], self.b[i : i + 1])
            log_q = log_q - log_det
        return z, log_q


def make_baseline_density_step(k=32, batch_size=512, lr=1e-3, anneal_steps=2000, device="cpu"):
    """A callable doing one Adam update of K planar layers fitted to U1 by annealed reverse KL."""
    model = BaselineDensity(k).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    t = 0

    def step():
        nonlocal t
        beta = min(1.0, 0.01 + t / anneal_steps)
        z, log_q = model.sample(batch_size)
        loss = (log_q + beta * u1(z)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t += 1
        return loss

    step.model, step.optimizer = model, optimizer
    return step
