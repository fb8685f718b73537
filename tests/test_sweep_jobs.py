"""Grids beyond one process, through the real CLI: `sweep --jobs N` computes what one run at a
time computes, several sweeps on one --out divide the grid by the run folders' locks (a killed
one's run is resumed, not restarted), and --shard I/N parts cover the grid exactly once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from forkserver import ForkedProcess
from test_run_folder_cli import TINY as RUN_FOLDER_TINY

from flowvae.errors import ConfigError
from flowvae.runlock import holder
from flowvae.sweep import GridShard, parse_shard

# test_run_folder_cli's tiny density run, logged and checkpointed every 50 steps
TINY = [*RUN_FOLDER_TINY, "train.checkpoint_every=50", "train.eval_every=50", "train.log_every=50"]


def tiny_sweep(out: Path, steps: int, *grid: str) -> list[str]:
    args = ["sweep", "--config", "energy", *(f"--set={o}" for o in TINY)]
    return [*args, f"--set=train.steps={steps}", *grid, "--out", str(out), "--no-progress"]


def start(spawn_cli, args: list[str]) -> ForkedProcess:
    return spawn_cli(*args, ready=lambda: True)


def finish(proc: ForkedProcess, timeout: float = 300) -> str:
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr
    return stderr


def lines(path: Path) -> list[dict]:
    """metrics.jsonl's rows (a line being written at the moment is left out)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def numbers(rows: list[dict]) -> list[dict]:
    """Metrics without the clock (steps/s and seconds differ from run to run)."""
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "seconds")} for r in rows]


def trained_by(stderr: str) -> set[str]:
    """Runs a sweep trained: '[i/n] NAME: new|partial' (one at a time), 'NAME: started'
    (--jobs, the worker's own lines are in RUN/log.txt)."""
    found = set()
    for line in stderr.splitlines():
        name, _, status = line.partition("] ")[2].partition(": ")
        if status in ("new", "partial") or status.startswith("started"):
            found.add(name)
    return found


def assert_trained_once(run: Path, steps: int) -> None:
    """Every logged step once, in order: no two writers interleaved, nothing trained twice."""
    train = [r["step"] for r in lines(run / "metrics.jsonl") if r["split"] == "train"]
    assert train == list(range(50, steps + 1, 50)), (run, train)
    assert json.loads((run / "eval.json").read_text())["kind"] == "density"


# -- the shard spec -------------------------------------------------------------------------------


def test_shards_are_fixed_and_cover_every_index_once():
    items = list(range(20))
    parts = [GridShard(i, 3).take(items) for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9, 12, 15, 18]
    assert parse_shard(" 2/9") == GridShard(2, 9)
    for bad in ("3/3", "1", "-1/3", "a/b", "1/0", "0/3/4", ""):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_a_bad_shard_is_one_line_and_writes_nothing(tmp_path, cli_in_process):
    out = tmp_path / "grid"
    result = cli_in_process(*tiny_sweep(out, 100, "--grid", "seed=0,1"), "--shard", "2/2")
    assert result.returncode == 2, result.stdout
    said = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("error: --shard '2/2'"), said
    assert not out.exists()


def test_a_folder_that_cannot_be_locked_is_said(tmp_path, cli_in_process, monkeypatch):
    """A mount that refuses flock (Lustre -o noflock: ENOSYS) runs unlocked, and says that
    sweeps sharing it could train a run twice."""
    import errno

    from flowvae import runlock

    def refuse(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(runlock.fcntl, "flock", refuse)
    out = tmp_path / "grid"
    result = cli_in_process(*tiny_sweep(out, 10, "--grid", "seed=0"), "--samples", "100")
    assert result.returncode == 0, result.stderr
    assert f"warning: {out / 'seed0'} cannot be locked here" in result.stderr, result.stderr
    assert "--shard" in result.stderr and (out / "seed0" / "eval.json").exists()


def test_a_shard_with_no_runs_ends_at_once(tmp_path, cli_in_process):
    out = tmp_path / "grid"
    result = cli_in_process(*tiny_sweep(out, 10, "--grid", "seed=0,1"), "--shard", "2/3")
    assert result.returncode == 0, result.stderr
    assert "shard 2/3 holds none of this grid's 2 runs" in result.stderr, result.stderr
    assert not out.exists()


# -- through the CLI -----------------------------------------------------------------------------


def test_shards_together_cover_the_grid_exactly_once(tmp_path, spawn_cli):
    """Two shards in two processes at once over a 2 × 3 grid (the shard count divides neither
    axis, so a part is no slice of one)."""
    out = tmp_path / "grid"
    args = tiny_sweep(out, 50, "--grid", "seed=0,1", "--grid", "flow.k=1,2,4")
    procs = [start(spawn_cli, [*args, "--shard", f"{i}/2"]) for i in range(2)]
    said = [finish(p) for p in procs]
    parts = [trained_by(s) for s in said]
    names = {f"seed{s}-k{k}" for s in range(2) for k in (1, 2, 4)}
    assert sorted(sum(map(sorted, parts), [])) == sorted(names), parts
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    # part i is the runs at positions i, i + 2, i + 4 of the expanded grid (k varies fastest)
    assert parts[0] == {"seed0-k1", "seed0-k4", "seed1-k2"}, parts


def test_jobs_compute_what_one_run_at_a_time_computes(
    tmp_path, cli_in_process, monkeypatch, repo_root, mnist_dir
):
    """Two VAE runs side by side in worker processes, one thread each, against the same two
    one after another (in this process, also on one thread). Both sweeps are led from this
    process; the --jobs workers are `python -m flowvae` processes of this checkout."""
    path = os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = [
        "sweep",
        "--config",
        str(repo_root / "configs" / "mnist_quick.yaml"),
        f"--set=data.root={mnist_dir}",
        "--set=data.valid_size=500",
        "--set=model.hidden=[50]",
        "--set=train.steps=40",
        "--set=train.eval_every=20",
        "--set=train.log_every=10",
        "--grid",
        "flow.k=2,4",
        "--iw-samples",
        "5",
        "--limit",
        "50",
        "--no-progress",
    ]
    alone = cli_in_process(*base, "--out", tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    alone = alone.stderr
    together = cli_in_process(*base, "--out", tmp_path / "together", "--jobs", "2")
    assert together.returncode == 0, together.stderr
    together = together.stderr
    assert "2 at a time, 1 thread(s) each" in together, together
    assert "k2: finished" in together and "k4: finished" in together, together
    for name in ("k2", "k4"):
        a, b = tmp_path / "alone" / name, tmp_path / "together" / name
        assert numbers(lines(a / "metrics.jsonl")) == numbers(lines(b / "metrics.jsonl"))
        ea, eb = (json.loads((run / "eval.json").read_text()) for run in (a, b))
        assert ea["examples"] == 50 and ea["limit"] == 50
        assert numbers([ea]) == numbers([eb])
        assert f"{name}: evaluated" in (b / "log.txt").read_text()  # its own log
        assert not (a / "log.txt").exists()
    assert "[1/2] k2: new" in alone


@pytest.mark.slow
def test_two_sweeps_divide_a_grid_and_a_killed_one_is_resumed(tmp_path, spawn_cli):
    """Two sweeps started together on one --out (one of them with --jobs 2): each run trained
    once by one of them; one is SIGKILLed mid-run, started again, and the grid completes with
    the killed run resumed from its checkpoint."""
    out, steps = tmp_path / "grid", 600
    args = tiny_sweep(out, steps, "--grid", "seed=0,1,2,3")
    first = start(spawn_cli, args)
    second = start(spawn_cli, [*args, "--jobs", "2"])
    # kill the first sweep once a run it holds has a checkpoint and is not finished
    deadline = time.monotonic() + 240
    victim = None
    while victim is None:
        assert time.monotonic() < deadline and first.poll() is None, "no run to kill"
        for run in sorted(out.glob("seed*")):
            info = holder(run) or {}
            metrics = run / "metrics.jsonl"
            if info.get("pid") == first.pid and metrics.exists():
                logged = [r["step"] for r in lines(metrics) if r["split"] == "train"]
                if 100 <= max(logged, default=0) <= steps - 200:
                    victim = run
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    killed = trained_by(first.communicate(timeout=30)[1])
    before = lines(victim / "metrics.jsonl")
    again = start(spawn_cli, args)
    said = [finish(second), finish(again)]
    for run in sorted(out.glob("seed*")):
        assert_trained_once(run, steps)
    # No run was trained by two sweeps, but the killed one, which the others resumed: its
    # lines up to a step the last checkpoint certainly covers are kept as they were, steps/s
    # included (a clock reading that training the run again would not repeat).
    parts = [trained_by(s) for s in said]
    assert not parts[0] & parts[1] and killed & (parts[0] | parts[1]) == {victim.name}, parts
    assert parts[0] | parts[1] | killed == {f"seed{i}" for i in range(4)}
    log = victim / "log.txt"  # a --jobs worker's lines
    said_there = "".join(said) + (log.read_text() if log.exists() else "")
    assert f"{victim.name}: partial" in said_there, said_there
    covered = max(r["step"] for r in before) - 50
    after = lines(victim / "metrics.jsonl")
    assert [r for r in after if r["step"] <= covered] == [r for r in before if r["step"] <= covered]
