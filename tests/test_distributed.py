"""DistributedDataParallel on the CPU (gloo): 2 processes match 1 process with the same global batch.

The one-process runs are forked from tests/forkserver.py's server (a process of their own without
the interpreter's start); the torchrun ones start as a user starts them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: Each test launches torchrun with two processes (a few seconds of start-up each).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--config", "energy",
    "--set", "flow.k=4",
    "--set", "train.batch_size=64",
    "--set", "train.log_every=1",
    "--set", "train.lr_schedule=constant",
    "--set", "eval.valid_samples=500",
    "--set", "train.eval_every=10",
    "--set", "train.checkpoint_every=10",
    "--no-progress",
]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """Run in a new session and kill the whole group on timeout, so no rank is left behind."""
    proc = subprocess.Popen(
        [sys.executable, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one(server, args: list[str]) -> subprocess.CompletedProcess:
    """``flowvae ARGS`` (args as for ``python``: "-m", "flowvae", ...) in one forked process."""
    assert args[:2] == ["-m", "flowvae"], args
    return server().run(args[2:], env=_env(), timeout=300)


def _train(
    out: Path, steps: int, procs: int = 1, resume: bool = False, server=None
) -> subprocess.CompletedProcess:
    args = ["-m", "flowvae", "train", *COMMON, "--set", f"train.steps={steps}", "--out", str(out)]
    if resume:
        args.append("--resume")
    if procs > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        done = subprocess.run(
            [sys.executable, *launcher, *args], env=_env(), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    else:
        done = _one(server, args)
    assert done.returncode == 0, done.stderr[-2000:]


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["split"] == "train"]


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, fork_server) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "single"
    _train(out, 20, server=fork_server)
    return out


def test_two_processes_match_one_process(single, tmp_path):
    _train(tmp_path / "ddp", 20, procs=2)
    a, b = _losses(single), _losses(tmp_path / "ddp")
    assert len(a) == len(b) == 20
    # Same global batch and noise on both sides; only the order of float additions differs
    # (two half-batch means averaged by all-reduce), so agreement is to float32 rounding.
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (step, x, y)
    wa, wb = _weights(single), _weights(tmp_path / "ddp")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


def test_resume_with_a_different_number_of_processes(single, tmp_path, fork_server):
    out = tmp_path / "mixed"
    _train(out, 10, procs=2)
    _train(out, 20, procs=1, resume=True, server=fork_server)
    wa, wb = _weights(single), _weights(out)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_processes_is_a_clear_error(tmp_path):
    args = [
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "flowvae", "train", *COMMON, "--set", "train.batch_size=63", "--set", "train.steps=2",
        "--out", str(tmp_path / "odd"),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    # Each rank prints the one-line error; torchrun then adds its own report of failed children.
    assert "error: train.batch_size = 63 is not divisible by the 2 processes" in done.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_run(tmp_path):
    args = ["-m", "flowvae", "train", *COMMON, "--set", "train.steps=20", "--device", "cuda"]
    done = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "cuda")],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "cuda").values())


def test_sharded_evaluation_matches_one_process(tmp_path, mnist_dir, fork_server):
    """torchrun eval with 2 processes gives the single process's -log p(x) and -ELBO: each
    chunk's noise depends only on (seed, chunk), whichever process evaluates it."""
    out = tmp_path / "vae"
    train = [
        "-m", "flowvae", "train", "--config", "mnist_quick",
        "--set", f"data.root={mnist_dir}", "--set", "train.steps=30", "--set", "model.hidden=[64]",
        "--set", "flow.k=3", "--set", "data.valid_size=500", "--set", "train.eval_every=30",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    done = _one(fork_server, train)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = str(out / "checkpoints" / "last.pt")
    # 5 chunks of 10 images (100 rows / 10 samples): rank 0 takes 3, rank 1 takes 2.
    args = ["-m", "flowvae", "eval", ckpt, "--json", "--iw-samples", "10", "--limit", "50",
            "--max-rows", "100", "--data-root", str(mnist_dir)]  # fmt: skip
    one = _one(fork_server, args)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _run(launcher + args)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads(one.stdout.strip().splitlines()[-1])
    lines = [x for x in two.stdout.strip().splitlines() if x.startswith("{")]
    assert len(lines) == 1, two.stdout  # only rank 0 reports
    b = json.loads(lines[0])
    assert a["examples"] == b["examples"] == 50
    for key in ("nll", "neg_elbo", "nll_stderr"):
        assert abs(a[key] - b[key]) <= 1e-9 * abs(a[key]), (key, a[key], b[key])
    # A different seed gives different noise: the agreement above is not a constant.
    other = _one(fork_server, args + ["--seed", "1"])
    assert json.loads(other.stdout.strip().splitlines()[-1])["nll"] != a["nll"]
