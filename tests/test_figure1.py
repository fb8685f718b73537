"""The paper's Figure 1 (flowvae.figure1): every panel is a normalised density on its grid."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowvae.figure1 import SPEC, Grid, density_on_grid, edge_error, panels, read_spec
from tests.conftest import _cli_env


@pytest.fixture(scope="module")
def spec():
    spec = read_spec()
    spec["grid"] = 160  # coarser than the picture's, for speed; the bound below scales with it
    return spec


@pytest.fixture(scope="module")
def rows(spec):
    return panels(spec)


def test_shape_of_the_figure(spec, rows):
    assert len(rows) == 4 and [r["base"] for r in spec["rows"]] == ["gaussian", "uniform"] * 2
    assert [r["flow"] for r in spec["rows"]] == ["planar", "planar", "radial", "radial"]
    assert all(
        [title for title, *_ in row] == ["$q_0$", "K = 1", "K = 2", "K = 10"] for row in rows
    )


def test_each_panel_integrates_to_one_within_the_grid_error(spec, rows):
    """Σ q · cell = 1 - (mass outside the window), up to the cells the support's edge cuts
    (uniform base) and the Monte Carlo error of the outside mass (samples of q_K)."""
    grid = Grid(float(spec["window"]), int(spec["grid"]))
    torch.manual_seed(0)
    n = 20000
    for row, cells in zip(spec["rows"], rows):
        for title, q, model in cells:
            with torch.no_grad():
                z, _ = model.sample(n)
            outside = float((z.abs() > grid.window).any(-1).double().mean())
            mass = float(q.sum() * grid.cell)
            tol = edge_error(q, grid.cell) + 3 * math.sqrt(max(outside, 1 / n) / n) + 1e-3
            assert abs(mass - (1 - outside)) < tol, (row, title, mass, outside, tol)
            if row["base"] == "gaussian":  # smooth: the midpoint rule is far better than that
                assert abs(mass - (1 - outside)) < 2e-3, (row, title, mass)


def test_uniform_panels_have_edges_and_zero_outside(spec, rows):
    for row, cells in zip(spec["rows"], rows):
        q0 = cells[0][1]
        if row["base"] != "uniform":
            assert (q0 > 0).all()
            continue
        half = spec["bases"]["uniform"]["half_width"]
        assert np.isclose(q0.max(), 1 / (2 * half) ** 2)  # the uniform's height
        assert (q0 == 0).mean() > 0.5  # the box covers (3/8)² of the window
        for _, q, _ in cells[1:]:
            assert (q == 0).any() and np.isfinite(q).all()


def test_k_panels_share_their_first_layers(spec):
    """K = 1 and 2 are the first layers of the K = 10 stack, so the pictures show one flow
    growing."""
    from flowvae.figure1 import flow_density

    row = spec["rows"][0]
    scales = spec["flows"][row["flow"]]
    base = spec["bases"][row["base"]]
    two = flow_density(row["flow"], base, 2, row["seed"], scales, 10)
    ten = flow_density(row["flow"], base, 10, row["seed"], scales, 10)
    for a, b in zip(two.flow.layers, ten.flow.layers[:2]):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    q = density_on_grid(two, Grid(4.0, 40))
    assert q.shape == (40, 40)


def test_figure1_cli_writes_a_png(tmp_path):
    spec_file = tmp_path / "small.yaml"
    spec_file.write_text(SPEC.read_text().replace("grid: 400", "grid: 60"))
    out = tmp_path / "f1.png"
    proc = subprocess.run(
        [sys.executable, "-m", "flowvae.figure1", "--config", spec_file, "--out", out],
        capture_output=True,
        text=True,
        env=_cli_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
