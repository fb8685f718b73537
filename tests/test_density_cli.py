"""The density experiment end to end through the real CLI, checked with real numbers: log Z of
U1..U4, a short training on U1, eval / sample outputs against independent estimates, exact resume,
and the informational commands."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import invoke_cli

from flowvae.targets import TARGETS, log_z_quadrature

TRAIN_STEPS = 1500

# ----------------------------------------------------------------------------- log Z


@pytest.mark.parametrize("name", ["U2", "U3", "U4"])
def test_closed_form_log_z_matches_quadrature(name):
    closed = TARGETS.get(name).log_z
    quad = log_z_quadrature.__wrapped__(name, n_r=4000, n_theta=2048, r_max=16.0)
    assert math.isfinite(closed)
    assert closed == pytest.approx(quad, abs=1e-4)


def test_u1_quadrature_is_converged():
    default = TARGETS.get("U1").log_z
    assert default == log_z_quadrature("U1")
    finer = log_z_quadrature.__wrapped__("U1", n_r=3200, n_theta=1024, r_max=10.0)
    assert default == pytest.approx(finer, abs=1e-6)
    assert 1.8 < default < 1.95  # a ring of radius 2, width 0.4, with two lobes: Z ≈ 6.5


# ----------------------------------------------------------------------------- one real run


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory):
    """U1, planar K=4, trained long enough (1500 steps, β reaches 1 at step 500) for the
    importance-weight check to be stable, by the CLI in this process (tests/test_user_errors.py
    trains U1 through `python -m flowvae`). Returns the run folder."""
    work = tmp_path_factory.mktemp("energy")
    out = work / "run"
    sets = [f"train.steps={TRAIN_STEPS}", "flow.k=4", "train.anneal_steps=500"]
    sets += ["train.eval_every=500", "train.checkpoint_every=500", "eval.valid_samples=2000"]
    with contextlib.chdir(work):
        proc = invoke_cli(
            "train", "--config", "energy", *(f"--set={s}" for s in sets), "--no-progress",
            "--out", out,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "runs").exists()  # --out was honoured
    return out


@pytest.fixture(scope="module")
def eval_json(energy_run):
    proc = invoke_cli(
        "eval", energy_run / "checkpoints" / "last.pt", "--json", "--samples", "20000"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def npz_samples(energy_run):
    """50,000 samples (seed 1: independent of the eval's seed-0 samples) as (z, log_q)."""
    path = energy_run / "x.npz"
    proc = invoke_cli(
        "sample", energy_run / "checkpoints" / "last.pt", "--out", path, "--n", "50000",
        "--seed", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with np.load(path) as data:
        assert sorted(data.files) == ["log_q", "z"]
        return data["z"], data["log_q"]


def test_run_folder_contents(energy_run):
    from flowvae.config import load_config

    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl"):
        assert (energy_run / name).is_file(), name
    cfg = load_config(energy_run / "config.yaml")
    assert (cfg.flow.k, cfg.train.steps, cfg.target.name) == (4, TRAIN_STEPS, "U1")

    records = [json.loads(line) for line in (energy_run / "metrics.jsonl").read_text().splitlines()]
    assert records
    assert all(isinstance(r["step"], int) for r in records)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(100, TRAIN_STEPS + 1, 100))
    assert all(math.isfinite(r["loss"]) for r in train)
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [500, 1000, 1500]
    assert all(math.isfinite(r["score"]) for r in valid)

    events = list((energy_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    info = json.loads((energy_run / "run.json").read_text())
    assert info["steps"] == TRAIN_STEPS and info["device"] == "cpu"
    assert info["train_seconds"] > 0 and "cores" in info["hardware"]


def test_eval_json(eval_json):
    r = eval_json
    assert r["kind"] == "density"
    assert (r["target"], r["flow"], r["k"], r["samples"], r["step"]) == (
        "U1",
        "planar",
        4,
        20000,
        TRAIN_STEPS,
    )
    for key in ("kl", "kl_stderr", "ess_fraction", "log_z", "mean_weight"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert r["log_z"] == pytest.approx(TARGETS.get("U1").log_z)
    assert 0 < r["kl_stderr"] < 0.2
    assert r["kl"] > -3 * r["kl_stderr"]  # KL ≥ 0 up to noise
    assert r["kl"] < 5  # trained: the untrained N(0, I) base is at about 8 nats
    assert 0 < r["ess_fraction"] <= 1


def test_eval_table(energy_run, cli_in_process):
    run_cli = cli_in_process
    proc = run_cli(
        "eval", energy_run / "checkpoints" / "best.pt", "--samples", "2000", cwd=energy_run
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("metric", "kl_stderr", "ess_fraction", "log_z", "samples", "2000", "planar"):
        assert row in proc.stdout, row
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)


def test_report_table_cells(eval_json):
    """A cell is KL ± s.e. for one run and the seeds' KLs in seed order for several, to four
    decimals: good fits differ in the third (planar K = 8 vs 32 on U1: about 0.013 vs 0.003)."""
    from flowvae.experiments.density import kl_table

    one = kl_table([{**eval_json, "config": {"seed": 0}}])
    assert f"| U1 | {eval_json['kl']:.4f} ± {eval_json['kl_stderr']:.4f} |" in one
    assert one.splitlines()[0] == "| target | planar K=4 |"

    other = {**eval_json, "kl": eval_json["kl"] / 3, "config": {"seed": 1}}
    two = kl_table([other, {**eval_json, "config": {"seed": 0}}])
    assert f"| U1 | {eval_json['kl']:.4f} / {eval_json['kl'] / 3:.4f} |" in two


def test_sample_png(energy_run, cli_in_process):
    run_cli = cli_in_process
    from PIL import Image

    path = energy_run / "x.png"
    proc = run_cli("sample", energy_run / "checkpoints" / "best.pt", "--out", path, cwd=energy_run)
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        img.load()
    assert width > 100 and height > 50


def test_npz_shapes(npz_samples):
    z, log_q = npz_samples
    assert z.shape == (50000, 2) and log_q.shape == (50000,)
    assert np.isfinite(z).all() and np.isfinite(log_q).all()


def test_eval_kl_agrees_with_npz_estimate(eval_json, npz_samples):
    z, log_q = npz_samples
    target = TARGETS.get("U1")
    d = log_q + target.energy(torch.from_numpy(z)).numpy()  # log q - log p̃, float64
    kl = d.mean() + target.log_z
    stderr = d.std(ddof=1) / math.sqrt(d.size)
    combined = math.hypot(stderr, eval_json["kl_stderr"])
    assert abs(kl - eval_json["kl"]) < 3 * combined, (kl, eval_json["kl"], combined)


def test_u1_importance_weights_average_to_one(npz_samples):
    """E_q[p/q] = 1 exactly; U1 has light tails, so the sample mean is within a few percent."""
    z, log_q = npz_samples
    target = TARGETS.get("U1")
    log_w = -target.energy(torch.from_numpy(z)).numpy() - target.log_z - log_q
    assert np.exp(log_w).mean() == pytest.approx(1.0, abs=0.05)


def test_sampled_log_q_matches_inverse(energy_run, npz_samples):
    """log q_K(z) from the forward pass equals log q_K through the flow's inverse."""
    from flowvae.runs import load_run

    run = load_run(energy_run / "checkpoints" / "last.pt", device="cpu")
    z, log_q = npz_samples
    model = run.experiment.model
    with torch.no_grad():
        via_inverse = model.log_prob(torch.from_numpy(z).to(next(model.parameters()).dtype))
    torch.testing.assert_close(
        via_inverse.double(), torch.from_numpy(log_q), atol=1e-4, rtol=0, check_dtype=False
    )


# ----------------------------------------------------------------------------- resume


def test_resume_continues_exactly(tmp_path, cli_in_process):
    run_cli = cli_in_process  # three runs without three start-ups
    # A constant learning rate: a cosine schedule is defined by train.steps, so a run first
    # planned for 100 steps and then extended to 200 would follow a different schedule.
    common = [
        "train",
        "--config",
        "energy",
        "--set",
        "flow.k=2",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.lr_schedule=constant",
        "--set",
        "train.log_every=50",
        "--set",
        "train.eval_every=100",
        "--set",
        "train.checkpoint_every=100",
        "--set",
        "eval.valid_samples=256",
        "--device",
        "cpu",
        "--no-progress",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    for extra in (
        ["--set", "train.steps=200", "--out", a],
        ["--set", "train.steps=100", "--out", b],
        ["--set", "train.steps=200", "--out", b, "--resume"],
    ):
        proc = run_cli(*common, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr

    ckpt_a = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    ckpt_b = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt_a["step"] == ckpt_b["step"] == 200
    assert ckpt_a["model"].keys() == ckpt_b["model"].keys()
    for key, tensor in ckpt_a["model"].items():
        # Same seeds, one thread, same op order: CPU training is bitwise reproducible.
        assert torch.equal(tensor, ckpt_b["model"][key]), key

    def train_losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]

    assert train_losses(a) == train_losses(b)  # and the resumed log holds no duplicate steps
    assert [s for s, _ in train_losses(b)] == [50, 100, 150, 200]


# ----------------------------------------------------------------------------- info commands


def test_list_names_everything(cli_in_process, tmp_path):
    run_cli = cli_in_process
    proc = run_cli("list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("planar", "radial", "nice", "U1", "U2", "U3", "U4", "mnist", "density", "vae"):
        assert name in proc.stdout, name


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["--version"]])
def test_help_exits_zero(run_cli, tmp_path, args):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    if args == ["train", "--help"]:
        assert "--config" in proc.stdout and "--resume" in proc.stdout
        # paragraphs flow to the terminal's width (200 here), not the docstring's line breaks
        assert "metrics.jsonl and TensorBoard logs" in proc.stdout


def test_keys_lists_train_lr(cli_in_process, tmp_path):
    run_cli = cli_in_process
    proc = run_cli("keys", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for key in ("train.lr", "flow.k", "model.hidden", "data.valid_size", "eval.iw_samples"):
        assert key in proc.stdout, key
