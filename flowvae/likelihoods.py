"""Observation models p(x|z) of the VAE decoder, one registry entry each (`flowvae list`).

- ``bernoulli``: binary pixels, from the decoder's logits (the paper's MNIST experiment).
- ``logit_normal``: pixels in (0, 1), Gaussian in logit space with a per-pixel mean and scale
  from the decoder (the paper's CIFAR-10 experiment, Table 3). With the change-of-variables
  term, −log p(x) is a true density over x in nats, which may be negative.

A likelihood says which pixels it scores (``pixels``: "binary" or "continuous"; the dataset
draws them accordingly, see flowvae.data.pixels) and how many decoder outputs it needs per
pixel (``outputs``). The maths is in pure functions below, one formula each.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.registry import Registry

__all__ = [
    "LIKELIHOODS",
    "Bernoulli",
    "Likelihood",
    "LogitNormal",
    "bernoulli_log_lik",
    "bits_per_dim",
    "bits_per_dim_8bit",
    "logit_normal_log_lik",
]

LOG_2PI = math.log(2 * math.pi)
LN2 = math.log(2)


class Likelihood(Protocol):
    #: The pixels it scores: "binary" ({0, 1}) or "continuous" (in (0, 1)).
    pixels: ClassVar[str]
    #: Decoder outputs per pixel (1: logits; 2: location and log-scale).
    outputs: ClassVar[int]
    #: What ``picture`` shows, as the key of `flowvae sample --out x.npz`.
    picture_name: ClassVar[str]

    def log_prob(self, out: Tensor, x: Tensor) -> Tensor:
        """log p(x|z) per row from the decoder's output ``out`` (rows of outputs·D); ``x`` is
        (n, D) aligned with ``out``, or (n, 1, D) against n·s rows, s consecutive per image."""

    def picture(self, out: Tensor) -> Tensor:
        """(rows, D) values in [0, 1] to show as images."""


LIKELIHOODS: Registry = Registry("likelihood")


def bernoulli_log_lik(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) = Σ x·l - softplus(l) from logits (stable, no clamping). x may be (n, 1, d)
    against logits (n·s, d), s consecutive rows per image, so importance samples never copy x."""
    if x.shape == logits.shape:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    grouped = logits.view(x.shape[0], -1, x.shape[-1])  # (n, s, d) rows of image i together
    return ((grouped * x).sum(-1) - F.softplus(grouped).sum(-1)).reshape(-1)


def logit_normal_log_lik(out: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) of pixels x_i ∈ (0, 1) whose logits are Gaussian:

        log p(x|z) = Σ_i [ log N(y_i; μ_i, σ_i²) − log x_i − log(1 − x_i) ],  y_i = logit(x_i)
                   = Σ_i [ −½((y_i − μ_i)/σ_i)² − log σ_i − ½ log 2π − log x_i − log(1 − x_i) ]

    (the paper's p(x) = Π N(logit x_i | μ_i, σ_i²) / (x_i (1 − x_i)); the last two terms are
    log |dy_i/dx_i|, the change of variables that makes this a density over x). ``out`` holds
    [μ | log σ] per row (2·D columns); ``x`` is (n, D) aligned with it or (n, 1, D) against
    n·s rows, s consecutive per image (the log-Jacobian is then computed once per image).
    """
    d = x.shape[-1]
    xs = x.reshape(x.shape[0], -1, d)  # (n, 1, d)
    params = out.view(x.shape[0], -1, 2 * d)  # (n, s, 2d)
    mu, log_sigma = params[..., :d], params[..., d:]
    log_x, log_1mx = torch.log(xs), torch.log1p(-xs)
    z = (log_x - log_1mx - mu) * torch.exp(-log_sigma)
    log_jacobian = (log_x + log_1mx).sum(-1)  # (n, 1)
    log_normal = -0.5 * (z * z).sum(-1) - log_sigma.sum(-1) - 0.5 * d * LOG_2PI
    return (log_normal - log_jacobian).reshape(-1)


@LIKELIHOODS.register("bernoulli")
class Bernoulli:
    """Binary pixels: p(x|z) = Π_i σ(l_i)^x_i (1 − σ(l_i))^(1 − x_i) with decoder logits l."""

    pixels: ClassVar[str] = "binary"
    outputs: ClassVar[int] = 1
    picture_name: ClassVar[str] = "probs"

    def log_prob(self, out: Tensor, x: Tensor) -> Tensor:
        return bernoulli_log_lik(out, x)

    def picture(self, out: Tensor) -> Tensor:
        """The pixel probabilities σ(l)."""
        return torch.sigmoid(out)


@LIKELIHOODS.register("logit_normal")
class LogitNormal:
    """Pixels in (0, 1) with logit(x_i) ~ N(μ_i(z), σ_i(z)²): the decoder emits μ and log σ per
    pixel (one linear head of 2·D outputs), see :func:`logit_normal_log_lik`."""

    pixels: ClassVar[str] = "continuous"
    outputs: ClassVar[int] = 2
    picture_name: ClassVar[str] = "median"

    def log_prob(self, out: Tensor, x: Tensor) -> Tensor:
        return logit_normal_log_lik(out, x)

    def picture(self, out: Tensor) -> Tensor:
        """The per-pixel median σ(μ) (a logit-normal's mean has no closed form)."""
        return torch.sigmoid(out[..., : out.shape[-1] // 2])


def bits_per_dim(nll: float, dim: int) -> float:
    """bits/dim = −log p(x) / (D ln 2): nats of a D-dimensional density in bits per dimension, in
    the space the density is over (for continuous data here: x squeezed into (ε, 1 − ε))."""
    return nll / (dim * LN2)


def bits_per_dim_8bit(nll: float, dim: int, eps: float, levels: int = 256) -> float:
    """bits/dim in the space of the dequantised L-level pixels v = k + u ∈ [0, L)^D, from
    −log p(x) over x = ε + (1 − 2ε)·v/L (how flowvae.data.pixels makes continuous pixels):

        p_v(v) = p_x(x) · ((1 − 2ε)/L)^D,  so
        −log₂ p_v(v) / D = −log p_x(x) / (D ln 2) + log₂ L − log₂(1 − 2ε)

    Averaged over the dequantisation noise u this bounds the bits/dim of the discrete 8-bit
    pixels from above (Theis et al. 2016): the number image-model papers report.
    """
    return bits_per_dim(nll, dim) + math.log2(levels) - math.log2(1 - 2 * eps)
