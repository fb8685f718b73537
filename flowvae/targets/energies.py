"""The paper's four 2-D test energies U1..U4 (Rezende & Mohamed 2015, Table 1, Figure 3).

exp(-U2), exp(-U3) and exp(-U4) are not integrable along z1, so flowvae makes them proper
densities with a Gaussian factor: p_k(z) ∝ exp(-U_k(z) - z1²/8), i.e. z1 ~ N(0, 2²) (95 % of the
mass inside the paper's [-4, 4]² box). Their normalisers are then exact:
∫ exp(-½((z2 - c)/σ)²) dz2 = σ√(2π) for any shift c, so log Z = log(c_k · 2 · 2π) with
c = 0.4 (U2), 0.35 + 0.35 (U3), 0.4 + 0.35 (U4). U1 is proper as it stands; its log Z comes from
quadrature on a polar grid (see :func:`log_z_quadrature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from flowvae.plugins import PluginSource
from flowvae.registry import Registry


def _check_target(obj: object) -> str | None:
    return None if isinstance(obj, Target) else "is not a flowvae.targets.Target instance"


TARGETS: Registry = Registry(
    "target", plugins=PluginSource("target", "flowvae.targets", _check_target)
)


def _w1(z: Tensor) -> Tensor:
    return torch.sin(2.0 * math.pi * z[..., 0] / 4.0)


def _w2(z: Tensor) -> Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[..., 0] - 1.0) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3.0 * torch.sigmoid((z[..., 0] - 1.0) / 0.3)


def _neg_log_sum_exp(*exponents: Tensor) -> Tensor:
    return -torch.logsumexp(torch.stack(exponents, dim=0), dim=0)


def u1(z: Tensor) -> Tensor:
    r = z.norm(dim=-1)
    ring = 0.5 * ((r - 2.0) / 0.4) ** 2
    return ring + _neg_log_sum_exp(
        -0.5 * ((z[..., 0] - 2.0) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2.0) / 0.6) ** 2
    )


def u2(z: Tensor) -> Tensor:
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def u3(z: Tensor) -> Tensor:
    a = z[..., 1] - _w1(z)
    return _neg_log_sum_exp(-0.5 * (a / 0.35) ** 2, -0.5 * ((a + _w2(z)) / 0.35) ** 2)


def u4(z: Tensor) -> Tensor:
    a = z[..., 1] - _w1(z)
    return _neg_log_sum_exp(-0.5 * (a / 0.4) ** 2, -0.5 * ((a + _w3(z)) / 0.35) ** 2)


#: Standard deviation of the Gaussian factor on z1 that makes U2..U4 proper.
Z1_SCALE = 2.0


@dataclass(frozen=True)
class Target:
    """An unnormalised density p(z) ∝ exp(-energy(z)) on R² with a known normaliser."""

    name: str
    paper_energy: object  # the paper's U_k
    confined: bool  # adds z1²/(2·Z1_SCALE²) to make the density proper
    width: float | None  # Σ σ of the z2 Gaussians (closed-form log Z), None for quadrature

    def energy(self, z: Tensor) -> Tensor:
        u = self.paper_energy(z)
        if self.confined:
            u = u + 0.5 * (z[..., 0] / Z1_SCALE) ** 2
        return u

    @property
    def log_z(self) -> float:
        if self.width is None:
            return log_z_quadrature(self.name)
        return math.log(self.width * math.sqrt(2 * math.pi) * Z1_SCALE * math.sqrt(2 * math.pi))

    def log_prob(self, z: Tensor) -> Tensor:
        return -self.energy(z) - self.log_z


@cache
def log_z_quadrature(name: str, n_r: int = 1600, n_theta: int = 512, r_max: float = 8.0) -> float:
    """log ∫ exp(-U(z)) dz in float64 on a polar grid (trapezoid in θ: spectrally accurate
    for a periodic integrand; Simpson in r, with the integrand r·exp(-U) vanishing at both ends)."""
    target = TARGETS.get(name)
    r = torch.linspace(0.0, r_max, n_r + 1, dtype=torch.float64)
    theta = torch.arange(n_theta, dtype=torch.float64) * (2 * math.pi / n_theta)
    rr, tt = torch.meshgrid(r, theta, indexing="ij")
    z = torch.stack([rr * torch.cos(tt), rr * torch.sin(tt)], dim=-1)
    integrand = torch.exp(-target.energy(z)) * rr
    ring = integrand.sum(dim=1) * (2 * math.pi / n_theta)
    h = r_max / n_r
    weights = torch.ones(n_r + 1, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return math.log(float((ring * weights).sum() * h / 3.0))


for _name, _u, _confined, _width in (
    ("U1", u1, False, None),
    ("U2", u2, True, 0.4),
    ("U3", u3, True, 0.35 + 0.35),
    ("U4", u4, True, 0.4 + 0.35),
):
    TARGETS.register(_name)(Target(_name, _u, _confined, _width))
