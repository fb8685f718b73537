"""q_K(z|x) beside the true posterior p(z|x) of a VAE with a 2-D latent space, on a grid.

With two latent dimensions every density of the model can be evaluated on a grid of cells and
integrated by the midpoint rule (Σ value · cell):

    log p(x, z)  = log p(x|z) + log N(z; 0, I)                      the decoder and the prior
    log p(x)     = log Σ_cells p(x, z) · cell                        the normaliser, by quadrature
    p(z|x)       = p(x, z) / p(x)                                    the true posterior
    log q_0(z|x) = log N(z; μ(x), diag σ(x)²)                        the encoder's Gaussian
    log q_K(z|x) = log q_0(f⁻¹(z)) - Σ_k log|det J_k| at f⁻¹(z)      the flow, exactly

and the two KL divergences between q_K and p(z|x) are sums over the same cells. The grid's box
is found per image by zooming in: a coarse grid over the prior's [-6, 6]² (and the box of a few
thousand samples of q_K) is cut down, a few times, to the cells where p(x, z) or q_K is within
e^-25 of its peak; the final n × n grid covers that box. The log p(x) of the grid is then a check
on the importance-sampled estimate (flowvae.importance.importance_nll) and the other way
round, and Σ q_K · cell = 1 checks the flow's inverse and log-determinant.

Everything here is maths on tensors (float64); flowvae.posterior_figure draws it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowvae.errors import ConfigError

# The repository's importance sampler: imported here, and only here, for the posterior view.
from flowvae.importance import importance_nll, weight_diagnostics

LOG_2PI = math.log(2 * math.pi)
#: Cells whose log-density is this far below the peak hold a negligible share of the mass
#: (a Gaussian's mass outside its e^-25 contour is e^-25).
THRESHOLD = 25.0


def check_latent_2d(model) -> None:
    """A one-line error unless ``model`` is a VAE with a 2-D latent space."""
    dim = getattr(model, "latent_dim", None)
    if dim is None:
        raise ConfigError("the posterior view needs a VAE checkpoint (this run is not a VAE)")
    if dim != 2:
        raise ConfigError(
            f"the posterior view needs a 2-D latent space, this VAE has model.latent_dim = {dim}"
            " — train one with --config mnist_2d"
        )


def float64_copy(model):
    """The model in float64 (a copy; bf16 autocast off): grid sums of e^(log p) need the digits."""
    twin = copy.deepcopy(model).double().cpu()
    twin.bf16 = False
    return twin.eval()


@dataclass
class Box:
    """An n × n grid of cells on [lo_1, hi_1] × [lo_2, hi_2], evaluated at the cell centres."""

    lo: Tensor  # (2,)
    hi: Tensor  # (2,)
    n: int

    @property
    def step(self) -> Tensor:
        return (self.hi - self.lo) / self.n

    @property
    def cell(self) -> float:
        return float(self.step.prod())

    def axes(self) -> tuple[Tensor, Tensor]:
        centres = torch.arange(self.n, dtype=torch.float64) + 0.5
        return self.lo[0] + self.step[0] * centres, self.lo[1] + self.step[1] * centres

    def points(self) -> Tensor:
        """(n², 2) cell centres, z_1 varying fastest (row i of an (n, n) view is z_2's i-th)."""
        xs, ys = self.axes()
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)

    def extent(self) -> tuple[float, float, float, float]:
        return (float(self.lo[0]), float(self.hi[0]), float(self.lo[1]), float(self.hi[1]))


class Encoded:
    """One image and what the encoder says about it: μ, σ and the flow parameters λ(x)."""

    def __init__(self, model, x: Tensor) -> None:
        self.model, self.x = model, x.reshape(1, -1).double()
        with torch.no_grad():
            self.mu, self.sigma, self.params = model.encode(self.x)

    def log_joint(self, z: Tensor, chunk: int = 8192) -> Tensor:
        """log p(x|z) + log p(z) at the rows of z."""
        out = []
        with torch.no_grad():
            for part in torch.split(z, chunk):
                log_px = self.model.likelihood.log_prob(self.model.decode(part), self.x)
                out.append(log_px + gaussian(part))
        return torch.cat(out)

    def log_q0(self, z0: Tensor) -> Tensor:
        eps = (z0 - self.mu) / self.sigma
        return gaussian(eps) - self.sigma.log().sum(-1)

    def log_qk(self, z: Tensor) -> Tensor:
        """log q_K(z|x) at the rows of z: through the flow's inverse, with its log-determinant."""
        with torch.no_grad():
            z0, log_det = self.model.flow.inverse_with_log_det(z, self.params)
        return self.log_q0(z0) - log_det

    def sample_qk(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        with torch.no_grad():
            z, _ = self.model.flow(self.mu + self.sigma * eps, self.params)
        return z

    def reconstruction(self) -> Tensor:
        """What p(x|z) looks like at z = f_K(μ), the flow's image of the encoder's mean."""
        with torch.no_grad():
            z, _ = self.model.flow(self.mu, self.params)
            return self.model.picture(z)[0]


def gaussian(z: Tensor) -> Tensor:
    """log N(z; 0, I) over the last axis."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def _mass_box(points: Tensor, values: list[Tensor], step: Tensor) -> tuple[Tensor, Tensor]:
    """The bounding box of the cells where any of ``values`` is within THRESHOLD of its peak,
    padded by two cells."""
    keep = torch.zeros(points.shape[0], dtype=torch.bool)
    for v in values:
        keep |= v > v.max() - THRESHOLD
    chosen = points[keep]
    return chosen.min(0).values - 2 * step, chosen.max(0).values + 2 * step


def find_box(
    enc: Encoded,
    n: int,
    coarse: int = 64,
    passes: int = 3,
    start: float = 6.0,
    samples: int = 2000,
    generator: torch.Generator | None = None,
) -> Box:
    """A box holding p(z|x) and q_K(z|x) to e^-25 of their peaks (see the module docstring)."""
    z = enc.sample_qk(samples, generator)
    lo = torch.minimum(z.min(0).values, torch.full((2,), -start, dtype=torch.float64))
    hi = torch.maximum(z.max(0).values, torch.full((2,), start, dtype=torch.float64))
    for _ in range(passes):
        box = Box(lo, hi, coarse)
        pts = box.points()
        lo, hi = _mass_box(pts, [enc.log_joint(pts), enc.log_qk(pts)], box.step)
    return Box(lo, hi, n)


@dataclass
class PosteriorGrid:
    """The model's densities for one image on one grid, each (n, n) with rows along z_2."""

    box: Box
    log_joint: Tensor
    log_q0: Tensor
    log_qk: Tensor

    @property
    def log_px(self) -> float:
        """log p(x) = log Σ p(x, z) · cell (midpoint rule)."""
        return float(torch.logsumexp(self.log_joint.reshape(-1), 0)) + math.log(self.box.cell)

    @property
    def log_post(self) -> Tensor:
        """log p(z|x), normalised on the grid."""
        return self.log_joint - self.log_px

    def mass(self, log_density: Tensor) -> float:
        return float(torch.exp(log_density).sum()) * self.box.cell


def posterior_grid(enc: Encoded, box: Box) -> PosteriorGrid:
    pts = box.points()
    shape = (box.n, box.n)
    return PosteriorGrid(
        box,
        enc.log_joint(pts).view(shape),
        enc.log_q0(pts).view(shape),  # the encoder's Gaussian itself, at the grid's points
        enc.log_qk(pts).view(shape),
    )


def kl_on_grid(log_a: Tensor, log_b: Tensor, cell: float) -> float:
    """KL(a‖b) = Σ a (log a - log b) · cell over the cells where a > 0."""
    a = torch.exp(log_a)
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return float(terms.sum()) * cell


def summary(grid: PosteriorGrid) -> dict[str, float]:
    """The grid's numbers for one image: log p(x), both KLs between q_K and p(z|x), masses.
    (No KL for the base q_0: it is not the approximation when K > 0, and the grid, fitted to
    p(z|x) and q_K, need not hold it — q0_mass says how much of it is there.)"""
    post, cell = grid.log_post, grid.box.cell
    return {
        "log_px_grid": grid.log_px,
        "kl_q_p": kl_on_grid(grid.log_qk, post, cell),
        "kl_p_q": kl_on_grid(post, grid.log_qk, cell),
        "q_mass": grid.mass(grid.log_qk),
        "q0_mass": grid.mass(grid.log_q0),
        "box": [round(v, 4) for v in grid.box.extent()],
        "cells": grid.box.n,
    }


def importance_log_px(enc: Encoded, samples: int, seed: int = 0) -> dict[str, float]:
    """log p(x) by the repository's importance sampler with q_K as the proposal, S samples,
    with what the weights say of their own reliability: the Pareto k̂ (above 0.7 the estimate
    is not to be trusted: q_K misses mass of p(z|x)) and the delta-method standard error of
    log p(x), sd(w) / (mean(w) √S)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        est = importance_nll(enc.model, enc.x, samples, max_rows=4000, generator=gen)
    log_w = est.log_w[0].double()
    w = torch.exp(log_w - log_w.max())
    return {
        "log_px_is": -float(est.nll[0]),
        "is_khat": float(weight_diagnostics(est.log_w)["khat"][0]),
        "is_stderr": float(w.std() / (w.mean() * math.sqrt(samples))),
    }


def analyse(
    model, x: Tensor, n: int = 200, iw_samples: int = 5000, seed: int = 0
) -> tuple[dict[str, float], PosteriorGrid, Encoded]:
    """Everything the posterior view shows and reports for one image (``model`` in float64)."""
    enc = Encoded(model, x)
    box = find_box(enc, n, generator=torch.Generator().manual_seed(seed))
    grid = posterior_grid(enc, box)
    numbers = summary(grid)
    if iw_samples:
        numbers.update(importance_log_px(enc, iw_samples, seed), iw_samples=iw_samples)
    return numbers, grid, enc


def hpd_levels(log_density: Tensor, cell: float, masses=(0.5, 0.9, 0.99)) -> list[float]:
    """Density values whose upper level sets hold ``masses`` of the grid's mass (increasing),
    for drawing the true posterior's contours."""
    p = torch.exp(log_density).reshape(-1).sort(descending=True).values
    cum = torch.cumsum(p, 0) * cell / (p.sum() * cell)
    levels = [float(p[min(int(torch.searchsorted(cum, m)), p.numel() - 1)]) for m in masses]
    return sorted(set(levels))


def parse_indices(text: str) -> list[int]:
    """'0,7,42' or '0-19' (inclusive) or a mix -> image indices, one-line error otherwise."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ConfigError(
                f"--images {text!r}: give image indices such as 0,7,42 or a range 0-19"
            ) from None
    if not out:
        raise ConfigError(f"--images {text!r} names no image — e.g. --images 0,7,42")
    return out


def view(
    experiment, indices: list[int], split: str = "test", n: int = 200, iw_samples: int = 5000,
    seed: int = 0,
) -> list[tuple[int, dict, PosteriorGrid, Encoded]]:  # fmt: skip
    """The posterior view of a VAE experiment's ``split`` images ``indices``: per image
    (index, numbers, grid, encoded image), computed in float64 on the CPU."""
    check_latent_2d(experiment.model)
    data = getattr(experiment.data, split)
    bad = [i for i in indices if not 0 <= i < data.shape[0]]
    if bad:
        raise ConfigError(
            f"--images {bad[0]} is out of range: the {split} split has {data.shape[0]} images "
            f"(0 to {data.shape[0] - 1})"
        )
    model = float64_copy(experiment.model)
    return [(i, *analyse(model, data[i].cpu(), n, iw_samples, seed)) for i in indices]


#: Per-image numbers averaged in the JSON's "mean" (those that exist in every row).
MEAN_KEYS = ("log_px_grid", "log_px_is", "kl_q_p", "kl_p_q", "q_mass")


def as_json(rows: list[tuple[int, dict, PosteriorGrid, Encoded]], **about) -> dict:
    """What `flowvae posterior --json` prints: ``about`` (run, flow, K, ...), each image's
    numbers, and their means over the images."""
    images = [{"index": i, **numbers} for i, numbers, *_ in rows]
    keys = [k for k in MEAN_KEYS if all(k in r for r in images)]
    mean = {k: sum(r[k] for r in images) / len(images) for k in keys}
    return {**about, "images": images, "mean": mean, "count": len(images)}
