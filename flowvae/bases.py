"""Base densities q_0 for the density experiment (``model.base``).

Every base is an affine map of a fixed standard noise density: z_0 = μ + σ·ε, so

    log q_0(z_0) = log r(ε) - Σ log σ,   ε = (z_0 - μ) / σ

with r the noise density. The Gaussian bases use r = N(0, I); the uniform one uses r = U([-1, 1]^D),
whose log-density is -D log 2 inside the cube and -inf outside: a point the flow's inverse sends
outside the box has q_K = 0 there, which is what makes a uniform base's pictures have edges.

    standard   N(0, I), fixed
    diagonal   N(μ, diag σ²), μ and σ learnt (from μ = 0, σ = 1)
    uniform    U(μ - σ, μ + σ), the box [-2, 2]^D at the start, μ and σ learnt

A uniform base's q_K has bounded support (planar and radial layers move points a bounded
distance). KL(q_K‖p) needs only q_K ≪ p, which holds for the energies U1..U4 (positive
everywhere), so the density experiment's KL stays a true KL in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowvae.registry import Registry

LOG_2PI = math.log(2 * math.pi)


def gaussian_noise_log_prob(eps: Tensor) -> Tensor:
    """log N(ε; 0, I) summed over the last axis."""
    return -0.5 * (eps * eps).sum(-1) - 0.5 * eps.shape[-1] * LOG_2PI


def uniform_noise_log_prob(eps: Tensor) -> Tensor:
    """log U(ε; [-1, 1]^D): -D log 2 inside the closed cube, -inf outside."""
    inside = (eps.abs() <= 1.0).all(-1)
    value = torch.full_like(eps[..., 0], -eps.shape[-1] * math.log(2.0))
    return torch.where(inside, value, torch.full_like(value, -math.inf))


def gaussian_noise(n: int, dim: int, device, dtype) -> Tensor:
    return torch.randn(n, dim, device=device, dtype=dtype)


def uniform_noise(n: int, dim: int, device, dtype) -> Tensor:
    return 2.0 * torch.rand(n, dim, device=device, dtype=dtype) - 1.0


@dataclass(frozen=True)
class Base:
    """A base family: its noise (draw, log-density), whether μ and σ are learnt, σ at the start."""

    draw: Callable[..., Tensor]
    noise_log_prob: Callable[[Tensor], Tensor]
    learnable: bool
    scale: float = 1.0
    doc: str = ""


BASES: Registry[Base] = Registry("base")
BASES.register("standard")(Base(gaussian_noise, gaussian_noise_log_prob, False, doc="N(0, I)"))
BASES.register("diagonal")(
    Base(gaussian_noise, gaussian_noise_log_prob, True, doc="learnable diagonal Gaussian")
)
BASES.register("uniform")(
    Base(uniform_noise, uniform_noise_log_prob, True, scale=2.0, doc="learnable box")
)
