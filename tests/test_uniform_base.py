"""model.base: uniform — a bounded base density for the density experiment (flowvae.bases)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import invoke_cli

from flowvae import flows
from flowvae.bases import BASES, uniform_noise_log_prob
from flowvae.experiments.density import FlowDensity
from flowvae.figure1 import Grid, density_on_grid, edge_error
from flowvae.targets import TARGETS


def test_uniform_noise_density():
    eps = torch.tensor([[0.0, 0.0], [0.99, -0.99], [1.0, -1.0], [1.01, 0.0], [0.0, -3.0]])
    log_r = uniform_noise_log_prob(eps)
    assert torch.allclose(log_r[:3], torch.full((3,), -2 * math.log(2.0)))
    assert torch.isneginf(log_r[3:]).all()


def test_uniform_noise_draws_fill_the_cube():
    torch.manual_seed(0)
    eps = BASES.get("uniform").draw(100000, 2, "cpu", torch.float64)
    assert eps.abs().max() <= 1.0 and eps.abs().max() > 0.999
    assert torch.allclose(eps.mean(0), torch.zeros(2, dtype=eps.dtype), atol=0.01)
    assert torch.allclose(
        eps.var(0), torch.full((2,), 1 / 3, dtype=eps.dtype), atol=0.01
    )  # U(-1, 1)


@pytest.fixture(scope="module")
def uniform_radial():
    torch.manual_seed(3)
    model = FlowDensity(flows.build("radial", 2, 3), base="uniform").double()
    with torch.no_grad():
        model.mu.copy_(torch.tensor([0.3, -0.2]))
        model.log_sigma.copy_(torch.tensor([0.4, 0.1]))
    return model


def test_sampled_log_q_matches_the_inverse(uniform_radial):
    """Radial layers invert exactly: log q_K through the inverse equals the sampled log q_K."""
    with torch.no_grad():
        z, log_q = uniform_radial.sample(2000)
        assert torch.isfinite(log_q).all()
        assert torch.allclose(uniform_radial.log_prob(z), log_q, atol=1e-8)
        far = torch.tensor([[6.0, 0.0], [0.0, -6.0]], dtype=torch.float64)
        assert torch.isneginf(uniform_radial.log_prob(far)).all()  # off the bounded support


def test_uniform_q_k_integrates_to_one(uniform_radial):
    """The grid's mass is 1 up to the cells the support's edge cuts, and that error shrinks
    with the cell (first order in its side: 2e-2 at 150 cells a side, 3e-4 at 600)."""
    errors = []
    for n in (150, 600):
        grid = Grid(5.0, n)
        q = density_on_grid(uniform_radial, grid)
        mass = float(q.sum() * grid.cell)
        assert (q == 0).mean() > 0.3 and abs(mass - 1) < edge_error(q, grid.cell)
        errors.append(abs(mass - 1))
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 4


def test_uniform_base_starts_at_the_documented_box():
    model = FlowDensity(flows.build("planar", 2, 0), base="uniform")
    with torch.no_grad():
        z, log_q = model.sample(50000)
    assert z.abs().max() <= 2.0 and z.abs().max() > 1.99
    assert torch.allclose(log_q, torch.full_like(log_q, -math.log(16.0)))
    assert model.mu.requires_grad and model.log_sigma.requires_grad


def test_gaussian_bases_draw_the_same_noise_as_before():
    """The default bases still draw torch.randn, so earlier density runs reproduce bit for bit."""
    model = FlowDensity(flows.build("planar", 2, 2), base="diagonal")
    torch.manual_seed(5)
    a = model.noise(7)
    torch.manual_seed(5)
    assert torch.equal(a, torch.randn(7, 2))
    assert not FlowDensity(flows.build("planar", 2, 1), base="standard").mu.requires_grad


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("uniform")
    out = work / "run"
    proc = invoke_cli(
        "train", "--config", "energy", "--set", "model.base=uniform", "--set", "flow.k=8",
        "--set", "train.steps=400", "--set", "train.anneal_steps=100",
        "--set", "train.eval_every=200", "--set", "train.checkpoint_every=200",
        "--set", "eval.valid_samples=2000", "--no-progress", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_uniform_u1_run_trains_and_evaluates(uniform_run, cli_in_process):
    run_cli = cli_in_process
    proc = run_cli(
        "eval", uniform_run / "checkpoints" / "last.pt", "--json", "--samples", "20000",
        cwd=uniform_run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["target"] == "U1" and result["log_z"] == pytest.approx(TARGETS.get("U1").log_z)
    # a KL in nats against the exact normaliser: >= 0 up to its error, and far below the
    # untrained box's (the box [-2, 2]² against U1's two arcs: several nats)
    assert -3 * result["kl_stderr"] < result["kl"] < 2.0
    assert 0 < result["ess_fraction"] <= 1
    config = (uniform_run / "config.yaml").read_text()
    assert "base: uniform" in config


def test_uniform_run_samples_and_picture(uniform_run, cli_in_process):
    run_cli = cli_in_process
    npz, png = uniform_run / "z.npz", uniform_run / "q.png"
    for path in (npz, png):
        proc = run_cli("sample", uniform_run / "checkpoints" / "last.pt", "--out", path,
                       "--n", "5000", cwd=uniform_run)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    with np.load(npz) as data:
        assert np.isfinite(data["log_q"]).all() and data["z"].shape == (5000, 2)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_vae_with_a_uniform_base_is_a_one_line_error(tmp_path, cli_in_process):
    run_cli = cli_in_process
    out = tmp_path / "vae"
    proc = run_cli("train", "--config", "mnist_quick", "--set", "model.base=uniform",
                   "--out", out, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "model.base = 'uniform' applies to density runs only" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_keys_documents_the_uniform_base(cli_in_process, tmp_path):
    run_cli = cli_in_process
    proc = run_cli("keys", cwd=tmp_path)
    assert proc.returncode == 0 and "uniform" in proc.stdout and "[-2, 2]" in proc.stdout
