"""Robustness of training and of the files it reads and writes.

Interruption (SIGINT/SIGTERM save last.pt, --resume continues), SIGKILL at random moments
(resumed runs end bit-exact with an uninterrupted one), NaN injection (the guard skips bad
updates, stops after train.max_bad_steps), bad checkpoint files (one-line errors, exit 2,
pickles never executed), atomic writes under a full disk, and determinism. CPU only, short runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import forkserver
import pytest
import torch
from forkserver import ForkedProcess
from rich.console import Console
from typer.testing import CliRunner

from flowvae import checkpoint
from flowvae.cli import app
from flowvae.config import load_config
from flowvae.errors import CheckpointError, TrainingError
from flowvae.targets import TARGETS, Target
from flowvae.targets.energies import u2
from flowvae.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "energy"  # the shipped config, by name
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

#: A short density run: K=4 planar layers, small batches, validation only at the end.
TINY = [
    "flow.k=4",
    "train.batch_size=64",
    "train.steps=40",
    "train.checkpoint_every=10",
    "train.log_every=10",
    "train.eval_every=1000000",
    "eval.valid_samples=500",
    "eval.samples=500",
]


def tiny_cfg(*overrides: str):
    return load_config(CONFIG, [*TINY, *overrides])


def quiet() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


def assert_no_nan(path: Path) -> dict:
    ckpt = checkpoint.load(path)
    for t in tensors(ckpt):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"non-finite tensor in {path}"
    for key in ("best_score", "score"):
        value = ckpt.get(key)
        assert not (isinstance(value, float) and math.isnan(value)), f"{key} is NaN in {path}"
    return ckpt


def assert_same_model(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"model tensor {key} differs"


def leftovers(folder: Path) -> list[str]:
    """Temporary files save_atomic may leave behind (.NAME.tmp-PID)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def one_error_line(stderr: str, *needles: str, alone: bool = True) -> str:
    """The one ``error:`` line (and, with ``alone``, nothing else) on stderr."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    if alone:
        assert lines == errors, stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


# -- 1. SIGINT / SIGTERM through the real CLI -----------------------------------------------------


def _interrupt(proc: ForkedProcess, signum: int) -> tuple[int, str]:
    """Send ``signum``; the process's exit code and stderr, which must hold no traceback."""
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    return proc.returncode, stderr


@pytest.mark.slow
def test_sigint_and_sigterm_save_last_and_resume(tmp_path, spawn_cli):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    common = [
        "--set",
        "flow.k=4",
        "--set",
        "train.steps=1000",  # interrupted twice long before its end, then finished
        "--set",
        "train.checkpoint_every=50",
        "--no-progress",
        "--out",
        str(out),
    ]
    step = 0
    for signum, resume in ((signal.SIGINT, False), (signal.SIGTERM, True)):
        before = last.stat().st_mtime_ns if last.exists() else None
        args = [*common, *(["--resume"] if resume else [])]

        def written(before=before) -> bool:  # a checkpoint written by this process
            return last.exists() and last.stat().st_mtime_ns != before

        proc = spawn_cli("train", "--config", CONFIG, *args, ready=written)
        code, stderr = _interrupt(proc, signum)
        assert code == 128 + signum, stderr
        assert "interrupted" in stderr and "--resume" in stderr, stderr
        ckpt = checkpoint.load(last)
        assert 1000 > ckpt["step"] > step
        step = ckpt["step"]

    done = subprocess.run(
        [sys.executable, "-m", "flowvae", "train", "--out", str(out), "--resume"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(last)["step"] == 1000  # the stored length, not the CLI's default


@pytest.mark.slow
def test_interrupted_sweep_says_to_rerun_the_sweep(tmp_path, spawn_cli):
    """`flowvae sweep` has no --resume: its interrupted message must name what does resume."""
    out = tmp_path / "sweep"
    args = ["--set", "train.steps=100000", "--set", "train.checkpoint_every=50", "--no-progress"]
    ready = lambda: any(out.glob("*/checkpoints/last.pt"))  # noqa: E731
    proc = spawn_cli("sweep", "--config", CONFIG, *args, "--out", out, ready=ready)
    code, stderr = _interrupt(proc, signal.SIGINT)
    assert code == 128 + signal.SIGINT, stderr
    assert "interrupted" in stderr and "same sweep command" in stderr, stderr
    assert "--resume" not in stderr, stderr


# -- 2. SIGKILL at random moments -----------------------------------------------------------------


class ForkServer(forkserver.ForkServer):
    """tests/forkserver.py's server (each launch a forked child running the real CLI: it saves
    the ~5 s interpreter start of each of the 22 launches), with every child's stdout and
    stderr appended to ``log``."""

    def __init__(self, log: Path) -> None:
        super().__init__(ENV, ROOT)
        self.log = log

    def run(
        self, args: list[str], kill_after: float | None = None, watch: Path | None = None
    ) -> tuple[int, float, float | None]:
        """Run `flowvae <args>`, SIGKILLed after ``kill_after`` s if still running.
        (exit code, seconds, seconds until ``watch`` first existed)."""
        log = str(self.log)
        req = {"args": args, "cwd": str(ROOT), "env": ENV, "stdout": log, "stderr": log}
        pid = self.submit(req | {"append": True})
        start = time.monotonic()
        limit = start + (300 if kill_after is None else kill_after)
        seen = None
        while (answer := self.answer(pid, 0.01 if watch else limit - time.monotonic())) is None:
            now = time.monotonic()
            if seen is None and watch is not None and watch.exists():
                seen = now - start
            if now >= limit:
                assert kill_after is not None, "run did not finish in 300 s"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                answer = self.answer(pid, 60)
                break
        assert answer is not None, "no exit status from the fork server"
        return answer, time.monotonic() - start, seen


KILL_STEPS = 600
KILLS = 20


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_exact(tmp_path):
    def args(out: Path) -> list[str]:
        return [
            "train",
            "--config",
            str(CONFIG),
            "--set",
            "flow.k=4",
            "--set",
            f"train.steps={KILL_STEPS}",
            "--set",
            "train.checkpoint_every=20",
            "--set",
            "train.batch_size=64",
            "--set",
            "train.eval_every=1000000",
            "--set",
            "eval.valid_samples=1000",
            "--no-progress",
            "--out",
            str(out),
        ]

    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    server = ForkServer(tmp_path / "log.txt")
    try:
        code, t_ref, t_first = server.run(args(ref_dir), watch=ref_dir / "checkpoints" / "last.pt")
        assert code == 0 and t_first, (tmp_path / "log.txt").read_text()[-3000:]

        # Seeded random delays: 0.3 to 1.3 times the time to the first checkpoint (start-up,
        # resume, the first steps and write), plus on average 80 % of the time the steps left
        # take when shared out over the kills left; capped at half the time the run needs to end.
        # So every kill lands inside the run (start-up, resume, a step, a checkpoint write,
        # the final validation) and the last ones near its end.
        rate = (KILL_STEPS - 20) / (t_ref - t_first)  # steps/s, final validation included
        t_start = max(t_first - 20 / rate, 0.0)
        rng = random.Random(20150521)
        kills, steps_seen, finished = 0, [], False
        while kills < KILLS:
            left = KILL_STEPS - (steps_seen[-1] if steps_seen else 0)
            share = 0.8 * left / (KILLS - kills + 1) / rate
            delay = t_first * rng.uniform(0.3, 1.3) + share * rng.uniform(0.0, 2.0)
            delay = min(delay, t_start + 0.5 * left / rate)  # room for a 2x faster machine
            resume = ["--resume"] if last.exists() else []
            code, _, _ = server.run(args(run_dir) + resume, kill_after=delay)
            if code != -signal.SIGKILL:
                assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
                finished = True  # the machine sped up: the run ended before the last kill
                break
            kills += 1
            for name in ("last.pt", "best.pt"):
                path = run_dir / "checkpoints" / name
                if path.exists():
                    ckpt = checkpoint.load(path)  # loadable after every kill
                    if name == "last.pt":
                        assert ckpt["step"] >= (steps_seen[-1] if steps_seen else 0)
                        steps_seen.append(int(ckpt["step"]))
        torn = leftovers(run_dir / "checkpoints")  # temp files of writes cut by a kill
        if not finished:
            code, _, _ = server.run(args(run_dir) + (["--resume"] if last.exists() else []))
            assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        server.close()

    assert kills >= KILLS // 2, f"only {kills} kills landed inside the run"
    assert len(set(steps_seen)) >= 2, f"the kills never let the run progress: {steps_seen}"
    ref = checkpoint.load(ref_dir / "checkpoints" / "last.pt")
    got = checkpoint.load(last)
    assert ref["step"] == got["step"] == KILL_STEPS
    assert_same_model(ref, got)
    for a, b in zip(tensors(ref["optimizer"]), tensors(got["optimizer"])):
        assert torch.equal(a, b)
    print(f"kills={kills} t_ref={t_ref:.2f}s t_first={t_first:.2f}s torn writes={len(torn)}")
    print(f"last.pt step after each kill: {steps_seen}")


# -- 3. NaN injection -----------------------------------------------------------------------------


class FlakyEnergy:
    """The (confined) U2 energy, NaN on the calls ``bad(n)`` selects (n counts from 1)."""

    def __init__(self, bad: Callable[[int], bool]) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        u = u2(z)
        return torch.full_like(u, math.nan) if self.bad(self.calls) else u


@contextlib.contextmanager
def registered_target(energy: FlakyEnergy) -> Iterator[str]:
    name = f"test-nan-{uuid.uuid4().hex[:8]}"
    TARGETS.register(name)(Target(name, energy, confined=True, width=0.4))
    try:
        yield name
    finally:
        TARGETS.unregister(name)
    assert name not in TARGETS


def test_occasional_nan_is_skipped_and_never_saved(tmp_path):
    energy = FlakyEnergy(lambda n: n % 7 == 0)
    console, buf = quiet()
    with registered_target(energy) as name:
        cfg = tiny_cfg(f"target.name={name}", "train.steps=70")
        result = train(cfg, tmp_path, progress=False, tensorboard=False, console=console)
    assert result.step == 70
    warnings = [line for line in buf.getvalue().splitlines() if "non-finite" in line]
    assert len(warnings) == 10, buf.getvalue()  # training calls 7, 14, ..., 70
    assert "update skipped (1/20 in a row)" in warnings[0]
    # the last step itself was skipped: last.pt must still be the final one
    assert assert_no_nan(tmp_path / "checkpoints" / "last.pt")["step"] == 70
    assert_no_nan(tmp_path / "checkpoints" / "best.pt")
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        assert "NaN" not in line, line


@pytest.mark.parametrize("max_bad", [5, 15])
def test_persistent_nan_stops_after_max_bad_steps(tmp_path, max_bad):
    energy = FlakyEnergy(lambda n: n > 30)
    console, buf = quiet()
    with registered_target(energy) as name:
        cfg = tiny_cfg(f"target.name={name}", "train.steps=1000", f"train.max_bad_steps={max_bad}")
        with pytest.raises(TrainingError) as excinfo:
            train(cfg, tmp_path, progress=False, tensorboard=False, console=console)
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"{max_bad} non-finite steps in a row at step {30 + max_bad}" in message
    assert f"train.max_bad_steps = {max_bad}" in message and "train.lr" in message
    assert str(tmp_path / "checkpoints" / "last.pt") in message
    assert energy.calls == 30 + max_bad  # 30 good steps, then exactly max_bad_steps bad ones
    assert buf.getvalue().count("non-finite") == 1  # said once, not once per skipped step
    # with 15, step 40 is a skipped one: its checkpoint holds the last good weights
    saved = assert_no_nan(tmp_path / "checkpoints" / "last.pt")["step"]
    assert saved == (30 + max_bad) // 10 * 10


def test_nan_from_the_first_step_says_there_is_no_checkpoint(tmp_path):
    energy = FlakyEnergy(lambda _: True)
    with registered_target(energy) as name:
        cfg = tiny_cfg(f"target.name={name}", "train.max_bad_steps=3")
        with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 3") as exc:
            train(cfg, tmp_path, progress=False, tensorboard=False, console=quiet()[0])
    assert "no checkpoint" in str(exc.value)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# -- 4. Bad output folders and bad checkpoint files -----------------------------------------------


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real")
    train(tiny_cfg("train.steps=20"), out, progress=False, tensorboard=False, console=quiet()[0])
    return out / "checkpoints" / "last.pt"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def train_args(out: Path) -> list[str]:
    return [
        "train",
        "--config",
        str(CONFIG),
        *(arg for override in TINY for arg in ("--set", override)),
        "--no-progress",
        "--out",
        str(out),
    ]


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").mkdir()
    except OSError:
        return False
    (folder / ".probe").rmdir()
    return True


def test_unwritable_output_folder(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if _writable(parent):  # root ignores the mode bits: /sys refuses new folders even to root
            parent = Path("/sys")
            if not parent.is_dir() or _writable(parent):
                pytest.skip("no folder this user cannot write to")
        result = invoke(*train_args(parent / "flowvae-robustness-run"))
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert result.exit_code == 2
    one_error_line(result.stderr, "cannot write to the output folder", "--out")
    assert not (parent / "flowvae-robustness-run").exists()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_output_path_at_or_under_a_regular_file(tmp_path, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file\n")
    out = blocker if where == "file" else blocker / "run"
    result = invoke(*train_args(out))
    assert result.exit_code == 2
    one_error_line(result.stderr, "cannot write to the output folder", "--out")
    assert blocker.read_text() == "a regular file\n"


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind: str, folder: Path, real: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(real.read_bytes()[:100])
        return path, ("not a readable flowvae checkpoint",)
    if kind == "empty":
        path.write_bytes(b"")
        return path, ("not a readable flowvae checkpoint",)
    if kind == "text":
        path.write_text("step: 10\nthis is not a checkpoint\n")
        return path, ("not a readable flowvae checkpoint",)
    if kind == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
        return path, ("not a readable flowvae checkpoint",)
    if kind == "foreign-dict":
        torch.save({"weights": torch.zeros(3)}, path)
        return path, ("not a flowvae checkpoint",)
    if kind == "missing":
        return path, ("does not exist",)
    if kind == "folder":
        path = folder / "a-folder"
        path.mkdir()
        return path, ("is a folder",)
    if kind == "pickle-exploit":
        ckpt = checkpoint.load(real)
        ckpt["model"] = Exploit(folder / "PWNED")
        torch.save(ckpt, path)
        return path, ("refusing to load", "weights_only=True")
    if kind == "schema-0":
        ckpt = checkpoint.load(real)
        ckpt["schema"] = 0
        torch.save(ckpt, path)
        return path, ("schema 0", "reads schema 1")
    raise AssertionError(kind)


BAD_FILES = [
    "truncated",
    "empty",
    "text",
    "random-bytes",
    "foreign-dict",
    "missing",
    "folder",
    "pickle-exploit",
    "schema-0",
]


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_checkpoint_files_fail_in_one_line(tmp_path, real_ckpt, kind, command):
    path, needles = _bad_file(kind, tmp_path, real_ckpt)
    extra = ["--out", str(tmp_path / "out.png")] if command == "sample" else ["--json"]
    result = invoke(command, str(path), *extra)
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, *needles)
    assert result.stdout == ""
    assert not (tmp_path / "PWNED").exists(), "the checkpoint's pickle was executed"
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


def test_real_checkpoint_still_evaluates(real_ckpt):
    result = invoke("eval", str(real_ckpt), "--json", "--samples", "500")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 20


# -- 5. Atomic writes and a full disk -------------------------------------------------------------


def disk_full_after(monkeypatch, good_saves: int) -> list[int]:
    """torch.save works ``good_saves`` times, then writes a few bytes and fails with ENOSPC."""
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= good_saves:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_save_atomic_success_leaves_no_temp_files(tmp_path):
    target = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic({"x": torch.arange(3)}, target)
    checkpoint.save_atomic({"x": torch.arange(4)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(4))


def test_save_atomic_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoint.save_atomic({"x": torch.arange(3)}, target)
    before = target.read_bytes()
    disk_full_after(monkeypatch, good_saves=0)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save_atomic({"x": torch.arange(5)}, target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_during_training_is_a_one_line_error(tmp_path, monkeypatch):
    calls = disk_full_after(monkeypatch, good_saves=2)  # last.pt at steps 10 and 20
    with pytest.raises(TrainingError) as excinfo:
        train(tiny_cfg(), tmp_path, progress=False, tensorboard=False, console=quiet()[0])
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("could not write checkpoint")
    assert "No space left on device" in message and "free space" in message
    assert "the previous checkpoint is intact" in message
    assert calls[0] == 3
    monkeypatch.undo()
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.load(ckpts / "last.pt")["step"] == 20
    assert leftovers(ckpts) == []


def test_full_disk_through_the_cli(tmp_path, monkeypatch):
    disk_full_after(monkeypatch, good_saves=1)
    result = invoke(*train_args(tmp_path))
    assert result.exit_code == 2
    one_error_line(
        result.stderr, "could not write checkpoint", "No space left on device", alone=False
    )


# -- 6. Determinism -------------------------------------------------------------------------------


def test_same_seed_same_parameters(tmp_path):
    runs = []
    for name in ("a", "b"):
        train(tiny_cfg(), tmp_path / name, progress=False, tensorboard=False, console=quiet()[0])
        runs.append(checkpoint.load(tmp_path / name / "checkpoints" / "last.pt"))
    assert_same_model(*runs)
    other = tiny_cfg("seed=1")
    train(other, tmp_path / "c", progress=False, tensorboard=False, console=quiet()[0])
    third = checkpoint.load(tmp_path / "c" / "checkpoints" / "last.pt")
    assert any(not torch.equal(third["model"][k], runs[0]["model"][k]) for k in third["model"])


# -- 3b. The guard without a per-step sync (CUDA's; forced here on the CPU) ------------------------


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr("flowvae.guard.uses_deferred", lambda *_: True)


@pytest.mark.usefixtures("deferred")
def test_deferred_guard_skips_nan_updates_without_syncing_each_step(tmp_path):
    energy = FlakyEnergy(lambda n: n % 7 == 0)
    console, buf = quiet()
    with registered_target(energy) as name:
        cfg = tiny_cfg(f"target.name={name}", "train.steps=70", "train.log_every=10")
        result = train(cfg, tmp_path, progress=False, tensorboard=False, console=console)
    assert result.step == 70
    warnings = [line for line in buf.getvalue().splitlines() if "non-finite" in line]
    # Checked every min(log_every, max_bad_steps) = 10 steps: one line per window with a bad
    # step (steps 7, 14, ..., 70 are bad: one in each of the 7 windows, two in 11..20 etc.).
    counts = [int(line.split("warning: ")[1].split()[0]) for line in warnings]
    assert sum(counts) == 10 and len(warnings) == 7, buf.getvalue()
    assert_no_nan(tmp_path / "checkpoints" / "last.pt")
    assert_no_nan(tmp_path / "checkpoints" / "best.pt")
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        assert "NaN" not in line, line


def test_deferred_guard_weights_match_the_sync_guard(tmp_path, monkeypatch):
    """Both guards skip exactly the same updates: identical final weights."""
    weights = []
    for mode in (False, True):
        monkeypatch.setattr("flowvae.guard.uses_deferred", lambda *_, m=mode: m)
        energy = FlakyEnergy(lambda n: n % 5 == 0)
        with registered_target(energy) as name:
            cfg = tiny_cfg(f"target.name={name}", "train.steps=40")
            out = tmp_path / str(mode)
            train(cfg, out, progress=False, tensorboard=False, console=quiet()[0])
        weights.append(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"])
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=0)


@pytest.mark.usefixtures("deferred")
def test_deferred_guard_stops_a_persistent_nan(tmp_path):
    energy = FlakyEnergy(lambda n: n > 30)
    with registered_target(energy) as name:
        cfg = tiny_cfg(f"target.name={name}", "train.steps=1000", "train.max_bad_steps=5")
        with pytest.raises(TrainingError, match="non-finite steps in a row") as excinfo:
            train(cfg, tmp_path, progress=False, tensorboard=False, console=quiet()[0])
    # Checked every min(log_every, 5) = 5 steps: the run of bad steps starts at 31 and is seen
    # at step 35 (5 in a row).
    assert "5 non-finite steps in a row at step 35" in str(excinfo.value)
    assert energy.calls == 35
    assert_no_nan(tmp_path / "checkpoints" / "last.pt")
