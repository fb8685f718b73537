"""A run folder that cannot be damaged: checkpoints that carry a digest of their contents,
atomic text writes, stale temporary files, the fallback for --resume, `flowvae verify`, and the
per-folder write lock (a real second process, a real SIGKILL). No mocks of the code tested."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowvae import checkpoint, run_folder
from flowvae.errors import CheckpointError, ConfigError, RunFolderBusy
from flowvae.runlock import LOCK_NAME, hold_run_folder

ROOT = Path(__file__).resolve().parents[1]


def real_checkpoint(step: int = 7, seed: int = 0) -> dict:
    """Model + Adam state after a real step: a few hundred KB of real tensors."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Tanh(), torch.nn.Linear(256, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(32, 128)).square().mean().backward()
    optimizer.step()
    return checkpoint.make_checkpoint(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        step=step,
        best_score=1.5,
        rng={"cpu": torch.get_rng_state()},
        config={"seed": seed, "flow": {"name": "planar", "k": 4}},
    )


def assert_same(a, b) -> None:
    """Equal nested dicts/lists, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def one_line_naming(exc: BaseException, path: Path) -> str:
    message = str(exc)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# -- checkpoints ----------------------------------------------------------------------------------


def test_round_trip_equals_the_saved_tensors(tmp_path):
    saved = real_checkpoint()
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic(saved, path)
    assert_same(checkpoint.load(path), saved)
    assert temps(path.parent) == []
    # the digest lives outside the dict: plain torch.load still reads the checkpoint as before
    assert_same(torch.load(path, weights_only=True), saved)
    assert checkpoint.check(path).status == "ok"


def test_schema_1_file_without_digest_still_loads(tmp_path):
    old = {**real_checkpoint(), "schema": 1, "version": "0.0.9"}
    path = tmp_path / "old.pt"
    torch.save(old, path)  # how flowvae 0.0.x wrote checkpoints
    assert_same(checkpoint.load(path), old)
    row = checkpoint.check(path)
    assert (row.status, row.ok) == ("legacy", True)
    assert "step 7" in row.detail


def test_flipped_bytes_anywhere_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save_atomic(real_checkpoint(), good)
    size = good.stat().st_size
    assert 200_000 < size < 2_000_000
    rng = random.Random(1234)
    offsets = sorted(rng.randrange(size) for _ in range(20))
    # and the edges: first byte, the zip end record's comment length, the digest's tag and hex
    tail = size - len(b"flowvae-sha256:") - 64
    offsets += [0, tail - 2, tail - 1, tail, tail + 3, size - 1]
    for offset in offsets:
        bad = tmp_path / f"flipped-at-{offset}.pt"
        bad.write_bytes(good.read_bytes())
        flip(bad, offset, rng.randrange(1, 256))
        with pytest.raises(CheckpointError) as excinfo:
            checkpoint.load(bad)
        message = one_line_naming(excinfo.value, bad)
        assert "is corrupted" in message, (offset, message)
        assert checkpoint.check(bad).status == "corrupt"


def test_digest_catches_a_flip_that_torch_load_misses(tmp_path):
    """The motivation: torch.load does not check the archive's CRCs, so a damaged weight loads
    silently. Flip one byte inside a weight matrix's stored data."""
    saved = real_checkpoint()
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(saved, path)
    weight = saved["model"]["0.weight"]
    offset = path.read_bytes().index(weight.numpy().tobytes()[:64]) + 1000
    flip(path, offset, 0x40)
    silently = torch.load(path, weights_only=True)["model"]["0.weight"]
    assert not torch.equal(silently, weight)  # torch.load returned damaged weights
    with pytest.raises(CheckpointError, match="is corrupted"):
        checkpoint.load(path)


def test_schema_2_without_its_digest_is_corrupt(tmp_path):
    path = tmp_path / "stripped.pt"
    torch.save(real_checkpoint(), path)  # schema 2 content, digest lost (e.g. re-saved by hand)
    with pytest.raises(CheckpointError) as excinfo:
        checkpoint.load(path)
    assert "digest is missing" in one_line_naming(excinfo.value, path)


# -- atomic text and stale temporary files --------------------------------------------------------


def test_write_text_atomic_replaces_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "run" / "run.json"
    checkpoint.write_text_atomic(target, '{"steps": 1}\n')
    checkpoint.write_text_atomic(target, '{"steps": 2}\n')
    assert json.loads(target.read_text()) == {"steps": 2}
    assert [p.name for p in target.parent.iterdir()] == ["run.json"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid no longer exists
    return proc.pid


def test_remove_stale_temps_removes_dead_writers_and_keeps_live_ones(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    dead, live = dead_pid(), os.getpid()
    stale = [
        tmp_path / "checkpoints" / f".last.pt.tmp-{dead}",
        tmp_path / f".config.yaml.tmp-{dead}",
    ]
    in_flight = tmp_path / "checkpoints" / f".best.pt.tmp-{live}"
    unrelated = tmp_path / "notes.tmp-12"  # not our pattern
    for p in [*stale, in_flight, unrelated]:
        p.write_bytes(b"partial")
    assert sorted(run_folder.remove_stale_temps(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert in_flight.exists() and unrelated.exists()
    assert run_folder.remove_stale_temps(tmp_path) == []


# -- --resume: the newest intact checkpoint -------------------------------------------------------


def test_newest_intact_prefers_last_then_falls_back(tmp_path):
    ckpts = tmp_path / "checkpoints"
    last, best = ckpts / "last.pt", ckpts / "best.pt"
    assert checkpoint.newest_intact(ckpts) is None  # nothing there yet
    checkpoint.save_atomic(real_checkpoint(step=200), last)
    checkpoint.save_atomic(real_checkpoint(step=150), best)

    found = checkpoint.newest_intact(ckpts)
    assert (found.path, found.ckpt["step"], found.rejected) == (last, 200, [])

    flip(last, last.stat().st_size // 2, 0xFF)
    found = checkpoint.newest_intact(ckpts)
    assert (found.path, found.ckpt["step"]) == (best, 150)
    assert [p for p, _ in found.rejected] == [last]
    assert "is corrupted" in found.rejected[0][1]

    flip(best, 100, 0x01)
    assert checkpoint.newest_intact(ckpts) is None


def test_newest_intact_goes_by_stored_step(tmp_path):
    ckpts = tmp_path / "checkpoints"
    checkpoint.save_atomic(real_checkpoint(step=100), ckpts / "last.pt")
    checkpoint.save_atomic(real_checkpoint(step=110), ckpts / "best.pt")  # validated later
    assert checkpoint.newest_intact(ckpts).path == ckpts / "best.pt"


# -- flowvae verify -------------------------------------------------------------------------------


def statuses(rows) -> dict[str, str]:
    return {row.file.name: row.status for row in rows}


def test_verify_reports_each_file_of_a_run_folder(tmp_path):
    run = tmp_path / "run"
    checkpoint.save_atomic(real_checkpoint(step=40), run / "checkpoints" / "last.pt")
    checkpoint.write_text_atomic(run / "config.yaml", "seed: 0\nflow: {name: planar}\n")
    assert statuses(run_folder.verify(run)) == {
        "last.pt": "ok",
        "best.pt": "missing",
        "config.yaml": "ok",
        "run.json": "missing",
    }

    checkpoint.save_atomic(real_checkpoint(step=30), run / "checkpoints" / "best.pt")
    flip(run / "checkpoints" / "best.pt", 5000, 0x10)
    (run / "config.yaml").write_text("seed: [0\n")  # torn
    (run / "run.json").write_text('{"steps": 40}\n')
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')  # cut by a kill
    stale = run / "checkpoints" / f".last.pt.tmp-{dead_pid()}"
    stale.write_bytes(b"PK")
    rows = run_folder.verify(run)
    assert statuses(rows) == {
        "last.pt": "ok",
        "best.pt": "corrupt",
        "config.yaml": "corrupt",
        "run.json": "ok",
        "metrics.jsonl": "corrupt",
        stale.name: "stale",
    }
    by_name = {row.file.name: row for row in rows}
    assert by_name["last.pt"].detail == "step 40, digest verified"
    assert "is corrupted" in by_name["best.pt"].detail
    assert "line 2" in by_name["metrics.jsonl"].detail
    assert [row.file.name for row in rows if not row.ok][:2] == ["best.pt", "config.yaml"]

    assert statuses(run_folder.verify(run / "checkpoints" / "best.pt")) == {"best.pt": "corrupt"}
    assert statuses(run_folder.verify(tmp_path / "nope.pt")) == {"nope.pt": "missing"}


# -- the run folder's write lock ------------------------------------------------------------------

HOLDER = """
import sys, time, pathlib
from flowvae.runlock import hold_run_folder
with hold_run_folder(sys.argv[1]):
    pathlib.Path(sys.argv[2]).write_text("ready")
    time.sleep(300)
"""


def lock_is_free(folder: Path) -> bool:
    """Try the lock through a new open file (flock conflicts even within one process)."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_second_process_is_refused_at_once_and_a_killed_holder_frees_the_folder(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the holder process died"
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)

        start = time.monotonic()
        with pytest.raises(RunFolderBusy) as excinfo:
            with hold_run_folder(run):
                pytest.fail("took a lock another process holds")
        assert time.monotonic() - start < 0.5
        message = one_line_naming(excinfo.value, run)
        assert f"pid {proc.pid}" in message and "choose another --out" in message
        assert excinfo.value.exit_code == 2

        proc.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock
        proc.wait(timeout=30)
        start = time.monotonic()
        with hold_run_folder(run):
            assert time.monotonic() - start < 0.5
            assert not lock_is_free(run)
            assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lock_is_free(run)
    assert (run / LOCK_NAME).read_text() == ""  # no stale holder left behind


def test_nested_acquisition_in_one_process(tmp_path):
    run = tmp_path / "a" / "run"
    with hold_run_folder(run) as outer:
        assert outer == run and run.is_dir()
        with hold_run_folder(tmp_path / "a" / ".." / "a" / "run"):  # same folder, other spelling
            assert not lock_is_free(run)
        assert not lock_is_free(run)  # the inner exit kept the outer hold
    assert lock_is_free(run)


def test_lock_is_released_after_an_exception(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with hold_run_folder(tmp_path), hold_run_folder(tmp_path):
            raise ZeroDivisionError
    assert lock_is_free(tmp_path)
    with hold_run_folder(tmp_path):  # and can be taken again
        pass


def test_lock_on_a_path_that_is_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file\n")
    with pytest.raises(ConfigError) as excinfo:
        with hold_run_folder(blocker / "run"):
            pass
    assert "cannot write to the output folder" in one_line_naming(excinfo.value, blocker)
    assert blocker.read_text() == "a regular file\n"


def test_sweep_saves_each_evaluation_as_it_is_done():
    """An interruption during the S = 5,000 evaluation keeps the S = 200 one before it."""
    from flowvae.sweep import EvalsWanted

    saved = []

    def evaluate(s):
        if s == 5000:
            raise KeyboardInterrupt
        return {"iw_samples": s, "nll": 85.0 + s / 1000, "nll_per_image": [85.0]}

    wanted = EvalsWanted("test", 200, [1000, 5000])
    with pytest.raises(KeyboardInterrupt):
        wanted.fill(None, evaluate, lambda r: saved.append(json.loads(json.dumps(r))))
    assert [r["iw_samples"] for r in saved] == [200, 200]
    assert list(saved[-1]["by_samples"]) == ["1000"] and not wanted.complete(saved[-1])
    # The next sweep starts from what was saved and computes only S = 5,000.
    asked = []
    done = wanted.fill(saved[-1], lambda s: asked.append(s) or {"iw_samples": s}, saved.append)
    assert asked == [5000] and wanted.complete(done)
