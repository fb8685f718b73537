"""The paper's Figure 1: hand-set planar and radial layers applied to a Gaussian and a uniform.

Each panel is the exact density of q_K on a grid, by change of variables through the flow's
inverse (flowvae.experiments.density.FlowDensity.log_prob): q_K(z) = q_0(f⁻¹(z)) / |det J_f|
at f⁻¹(z). The layer parameters are drawn from seeded distributions a YAML file names
(flowvae/figures/figure1.yaml); the K = 1 and 2 panels are the first layers of the K = 10 stack.

    python -m flowvae.figure1 --out docs/figure1.png        # what `make figure1` runs
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from flowvae import flows
from flowvae.experiments.density import FlowDensity
from flowvae.flows.radial import SLACK as RADIAL_SLACK

SPEC = Path(__file__).resolve().parent / "figures" / "figure1.yaml"


def read_spec(path: str | Path = SPEC) -> dict:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def softplus_inverse(y: float | Tensor) -> Tensor:
    """x with softplus(x) = y > 0."""
    y = torch.as_tensor(y, dtype=torch.float64)
    return y + torch.log(-torch.expm1(-y))


def planar_params(gen: torch.Generator, k: int, scales: dict) -> dict[str, Tensor]:
    """Raw (u, w, b̃) of k planar layers in 2-D: Gaussian with the configured scales."""
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return {
        "u": scales["u"] * draw(k, 2),
        "w": scales["w"] * draw(k, 2),
        "b": scales["b"] * draw(k, 1),
    }


def radial_params(gen: torch.Generator, k: int, scales: dict) -> dict[str, Tensor]:
    """Raw (z0, α', β') of k radial layers whose α ~ U(alpha) and β = c·α, c ~ U(beta_over_alpha)."""

    def uniform(lo_hi) -> Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(k, 1, generator=gen, dtype=torch.float64)

    z0 = scales["z0"] * torch.randn(k, 2, generator=gen, dtype=torch.float64)
    alpha = uniform(scales["alpha"])
    beta = uniform(scales["beta_over_alpha"]) * alpha
    # α = softplus(α') + SLACK and α + β = softplus(β') + SLACK (flowvae.flows.radial)
    return {
        "z0": z0,
        "alpha": softplus_inverse(alpha - RADIAL_SLACK),
        "beta": softplus_inverse(alpha + beta - RADIAL_SLACK),
    }


#: flow family -> how its hand-set layers are drawn (planar's û projection keeps each drawn
#: layer invertible, radial's β = c·α with c > -1 does)
LAYER_PARAMS = {"planar": planar_params, "radial": radial_params}


def flow_density(flow: str, base: dict, k: int, seed: int, scales: dict, drawn: int) -> FlowDensity:
    """q_K in float64: the first k of the ``drawn`` layers that ``seed`` draws for the figure."""
    raw = LAYER_PARAMS[flow](torch.Generator().manual_seed(seed), max(drawn, k), scales)
    stack = flows.build(flow, 2, k).double()
    with torch.no_grad():
        for i, layer in enumerate(stack.layers):
            for name, value in raw.items():
                getattr(layer, name).copy_(value[i])
    model = FlowDensity(stack, dim=2, base=base["name"]).double()
    with torch.no_grad():
        model.mu.zero_()
        model.log_sigma.fill_(math.log(base.get("half_width", 1.0)))
    return model


@dataclass
class Grid:
    """Cell centres of an n × n grid on [-window, window]² (midpoint rule: ∫ ≈ Σ q · cell)."""

    window: float
    n: int

    @property
    def cell(self) -> float:
        return (2 * self.window / self.n) ** 2

    def points(self) -> Tensor:
        h = 2 * self.window / self.n
        xs = -self.window + h * (torch.arange(self.n, dtype=torch.float64) + 0.5)
        gx, gy = torch.meshgrid(xs, xs, indexing="xy")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def density_on_grid(model: FlowDensity, grid: Grid) -> np.ndarray:
    """q_K at the grid's cell centres, (n, n) with rows along z2 (exact, through the inverse)."""
    with torch.no_grad():
        log_q = model.log_prob(grid.points())
    return torch.exp(log_q).view(grid.n, grid.n).numpy()


def edge_error(q: np.ndarray, cell: float) -> float:
    """A bound on the midpoint rule's error from cells the support's edge cuts: those next to
    a cell of the other side (q > 0 beside q = 0), each off by at most the largest density in
    its 3 × 3 neighbourhood times the cell area. 0 for a density positive everywhere."""
    padded = np.pad(q, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    positive = windows > 0
    cut = positive.any(axis=(-1, -2)) & ~positive.all(axis=(-1, -2))
    return float(windows.max(axis=(-1, -2))[cut].sum() * cell)


def panels(spec: dict) -> list[list[tuple[str, np.ndarray, FlowDensity]]]:
    """Rows of (column title, grid density, model): q_0, then each K of the spec."""
    grid = Grid(float(spec["window"]), int(spec["grid"]))
    rows = []
    for row in spec["rows"]:
        base = spec["bases"][row["base"]]
        scales = spec["flows"][row["flow"]]
        cells = []
        for k in [0, *spec["ks"]]:
            model = flow_density(row["flow"], base, k, int(row["seed"]), scales, max(spec["ks"]))
            cells.append(("$q_0$" if k == 0 else f"K = {k}", density_on_grid(model, grid), model))
        rows.append(cells)
    return rows


def draw(spec: dict, rows: list, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = float(spec["window"])
    fig, axes = plt.subplots(
        len(rows), len(rows[0]), figsize=(1.9 * len(rows[0]), 1.9 * len(rows)), dpi=120
    )
    for i, (row, cells) in enumerate(zip(spec["rows"], rows)):
        for j, (title, q, _) in enumerate(cells):
            ax = axes[i][j]
            top = float(np.percentile(q, spec.get("clip", 100.0)))
            ax.imshow(q, origin="lower", extent=(-w, w, -w, w), cmap="viridis", vmax=top or None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=10)
            if j == 0:
                base = "unit Gaussian" if row["base"] == "gaussian" else "uniform"
                ax.set_ylabel(f"{row['flow']}\n{base}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the paper's Figure 1.")
    parser.add_argument("--config", default=str(SPEC), help="the figure's YAML file")
    parser.add_argument("--out", default="docs/figure1.png", help="the PNG to write")
    args = parser.parse_args(argv)
    spec = read_spec(args.config)
    draw(spec, panels(spec), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
