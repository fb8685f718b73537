"""The run folder through the real trainer and CLI: one writer at a time, a killed writer frees the
folder at once, a damaged last.pt makes --resume fall back to an intact checkpoint, damaged
checkpoints never produce a result, and `flowvae verify` tells intact from damaged."""

from __future__ import annotations

import io
import os
import random
import signal
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flowvae import checkpoint
from flowvae.cli import app
from flowvae.config import load_config
from flowvae.runlock import hold_run_folder
from flowvae.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "flow.k=4",
    "train.lr_schedule=constant",  # so that a resumed run may be made longer
    "train.batch_size=64",
    "train.checkpoint_every=10",
    "train.eval_every=10",
    "train.log_every=10",
    "eval.valid_samples=500",
    "eval.samples=500",
]


def tiny(*overrides: str):
    return load_config("energy", [*TINY, *overrides])


def quiet() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=400), buf


def test_a_second_writer_is_refused_and_a_killed_one_frees_the_folder(tmp_path, spawn_cli):
    out = tmp_path / "run"
    # a density run that goes on until killed, once it has written its first checkpoint (so it
    # certainly holds the folder)
    args = [f"--set={o}" for o in TINY] + ["--set=train.steps=1000000", "--no-progress"]
    holder = spawn_cli(
        "train",
        "--config",
        "energy",
        *args,
        "--out",
        out,
        ready=(out / "checkpoints" / "last.pt").exists,
    )
    for resume in ([], ["--resume"]):
        before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        t0 = time.monotonic()
        config = [] if resume else ["--config", "energy"]  # --resume reads the run's own
        result = CliRunner().invoke(
            app, ["train", *config, "--out", str(out), *resume, "--no-progress"]
        )
        seconds = time.monotonic() - t0
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert str(out) in lines[0] and f"pid {holder.pid}" in lines[0], lines[0]
        assert seconds < 2.0, seconds
        # the refused command wrote nothing (the holder may have written meanwhile: only
        # files older than the refusal are compared)
        assert not (out / "run.json").exists()
        for p in out.rglob("*"):
            if p.is_file() and p.name in before and p.stat().st_mtime_ns < t0 * 1e9:
                assert p.stat().st_mtime_ns == before[p.name], p
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    # SIGKILL released the lock with its holder: the next writer takes it at once (the run
    # itself, 1,000,000 steps long, cannot be resumed shorter).
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] > 0
    with hold_run_folder(out):
        pass


def test_resume_falls_back_to_best_when_last_is_damaged(tmp_path):
    out = tmp_path / "run"
    train(tiny("train.steps=40", "train.eval_every=20"), out, console=quiet()[0], progress=False)
    best = checkpoint.load(out / "checkpoints" / "best.pt")
    last = out / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10
    last.write_bytes(bytes(data))
    console, buf = quiet()
    cfg = tiny("train.steps=60", "train.eval_every=20")
    result = train(cfg, out, resume=True, console=console, progress=False)
    said = buf.getvalue()
    assert "last.pt is corrupted" in said and f"resuming from best.pt (step {best['step']})" in said
    assert result.step == 60
    assert checkpoint.load(last)["step"] == 60  # the damaged file was replaced by a good one


def test_damaged_checkpoints_never_give_a_result(tmp_path):
    out = tmp_path / "run"
    train(tiny("train.steps=20"), out, console=quiet()[0], progress=False)
    good = (out / "checkpoints" / "last.pt").read_bytes()
    rng = random.Random(0)
    runner = CliRunner()
    for i in range(20):
        bad = tmp_path / f"bad{i}.pt"
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        result = runner.invoke(app, ["eval", str(bad), "--json", "--samples", "100"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], lines
        assert '"kl"' not in result.output


def test_verify_tells_intact_from_damaged(tmp_path):
    out = tmp_path / "run"
    train(tiny("train.steps=20"), out, console=quiet()[0], progress=False)
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("digest verified") == 2
    best = out / "checkpoints" / "best.pt"
    data = bytearray(best.read_bytes())
    data[100] ^= 0xFF
    best.write_bytes(bytes(data))
    (out / ".config.yaml.tmp-999999999").write_text("half a write")
    result = runner.invoke(app, ["verify", str(out)], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "corrupt" in result.output and "stale" in result.output


@pytest.mark.parametrize("what", ["train", "sweep"])
def test_nothing_written_atomically_is_left_half_done(tmp_path, what):
    """Every file a run writes replaces the old one whole: no temporary file is left behind."""
    if what == "train":
        train(tiny("train.steps=20"), tmp_path, console=quiet()[0], progress=False)
        folders = [tmp_path, tmp_path / "checkpoints"]
    else:
        args = ["sweep", "--config", "energy", *(f"--set={o}" for o in TINY)]
        args += ["--set=train.steps=10", "--grid", "flow.k=2,4", "--out", str(tmp_path)]
        result = CliRunner().invoke(app, [*args, "--no-progress", "--samples", "100"])
        assert result.exit_code == 0, result.output
        folders = [tmp_path / "k2", tmp_path / "k2" / "checkpoints"]
        assert (tmp_path / "k2" / "eval.json").exists()
    for folder in folders:
        assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]
