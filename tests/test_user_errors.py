"""What a user meets every day, through the CLI: every mistake is one line on stderr and exit
code 2 with nothing written, a resumed run is exactly what its folder says, `flowvae eval`
records its result for `flowvae report`, and options that do not apply to a checkpoint are
refused. One error of each kind runs the real CLI in a subprocess (`run_cli`: the real stderr,
warnings and exit code of a fresh interpreter: a missing dataset, NaN from the start, a
damaged checkpoint, out of memory, a failing sweep; tests/test_config.py runs a config error
so); the rest run the same Typer app in this process (`cli_in_process`), without the ~2 s
interpreter and torch start-up of each."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke_cli
from typer.testing import CliRunner

from flowvae import checkpoint
from flowvae.cli import _first_comment, app
from flowvae.config import SHIPPED, load_config, shipped_configs
from flowvae.train import train

#: A density run of a few seconds: K = 2, small batches, validation at the end only.
TINY = [
    "flow.k=2",
    "train.batch_size=16",
    "train.steps=30",
    "train.log_every=10",
    "train.eval_every=1000000",
    "train.checkpoint_every=1000000",
    "eval.valid_samples=200",
    "eval.samples=200",
]


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in overrides]


def listing(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its bytes' digest (folders: "dir"): byte-identical or not."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_error(proc, *needles: str) -> str:
    """Exit code 2, and stderr exactly one line: the error, holding every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def refused(run_cli, cwd: Path, args: list, *needles: str, watch: Path | None = None) -> str:
    """Run a command that must fail (``run_cli``: in a subprocess or in this process): one line,
    exit 2, and nothing new (or changed) in ``cwd`` nor in ``watch``."""
    folders = [cwd] + ([watch] if watch else [])
    before = [listing(f) for f in folders]
    proc = run_cli(*args, cwd=cwd)
    line = one_error(proc, *needles)
    assert [listing(f) for f in folders] == before, "a failed command wrote something"
    assert proc.stdout == ""
    return line


@pytest.fixture(scope="module")
def density_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("density")
    proc = invoke_cli("train", "--config", "energy", *sets(*TINY), "--out", work / "run")
    assert proc.returncode == 0, proc.stderr
    return work / "run"


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, mnist_dir) -> Path:
    work = tmp_path_factory.mktemp("vae")
    args = ["train", "--config", "mnist_quick", "--out", work / "run", "--no-progress"]
    args += sets(f"data.root={mnist_dir}", "train.steps=2", "model.hidden=[50]", "flow.k=2")
    proc = invoke_cli(*args, "--set=train.eval_every=2", "--set=data.valid_size=100")
    assert proc.returncode == 0, proc.stderr
    return work / "run"


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this user cannot create files in (root ignores mode bits: /sys then)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no folder this user cannot write to")


# -- train ----------------------------------------------------------------------------------------


def test_train_without_a_config_names_where_to_find_them(cli_in_process, tmp_path):
    run_cli = cli_in_process
    refused(run_cli, tmp_path, ["train", "--out", "run"], "needs a config", "flowvae configs")


def test_a_batch_that_cannot_fit_is_refused_before_training(cli_in_process, tmp_path):
    run_cli = cli_in_process
    line = refused(
        run_cli, tmp_path, ["train", "--config", "energy", "--set=train.batch_size=100000000"]
    )
    assert "train.batch_size = 100,000,000" in line and "GiB" in line, line


def test_missing_dataset_leaves_no_run_folder(run_cli, tmp_path):
    args = ["train", "--config", "mnist_quick", "--out", "run"]
    refused(run_cli, tmp_path, [*args, *sets(f"data.root={tmp_path}", "data.download=false")])


def test_a_text_file_given_as_npz_leaves_no_run_folder(cli_in_process, tmp_path):
    run_cli = cli_in_process
    bad = tmp_path / "mine.npz"
    bad.write_text("not an archive\n")
    args = ["train", "--config", "mnist_quick", "--out", "run"]
    refused(run_cli, tmp_path, [*args, *sets("data.name=npz", f"data.root={bad}")], str(bad))


def test_nan_from_the_start_leaves_nothing_and_warns_once(run_cli, tmp_path):
    nan = sets(*TINY, "train.lr=1e6", "train.grad_clip=0", "train.steps=200")
    proc = run_cli(
        "train", "--config", "energy", *nan, "--out", "run", "--no-progress", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("non-finite loss or gradient") == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing was kept" in errors[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_nan_stop_keeps_the_last_good_checkpoint_and_says_where(cli_in_process, tmp_path):
    run_cli = cli_in_process
    nan = sets(*TINY, "train.lr=1e6", "train.grad_clip=0", "train.steps=200")
    nan += sets("train.checkpoint_every=1", "train.log_every=1")  # step 1 is still finite
    proc = run_cli(
        "train", "--config", "energy", *nan, "--out", "run", "--no-progress", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("non-finite loss or gradient") == 1, proc.stderr
    last, metrics = tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "run" / "metrics.jsonl"
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert f"last good checkpoint: {Path('run/checkpoints/last.pt')}" in error, error
    assert "metrics in" in error and metrics.exists()
    for tensor in checkpoint.load(last)["model"].values():
        assert torch.isfinite(tensor).all()


def test_the_warm_up_longer_than_the_run_is_said_and_numbers_have_units(cli_in_process, tmp_path):
    run_cli = cli_in_process
    proc = run_cli("train", "--config", "energy", *sets(*TINY), "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    beta = 0.01 + 30 / 5000
    assert "train.anneal_steps = 5,000) is longer than the run" in proc.stderr, proc.stderr
    assert f"β ends at {beta:.2f}" in proc.stderr
    assert "best val KL" in proc.stderr and " nats; checkpoints in" in proc.stderr


def test_progress_line_names_its_numbers(tmp_path):
    import io

    from rich.console import Console

    buf = io.StringIO()
    cfg = load_config("energy", [*TINY, "train.eval_every=10"])
    train(cfg, tmp_path / "run", console=Console(file=buf, width=200), tensorboard=False)
    text = buf.getvalue()
    assert "KL " in text and " nats" in text and "val KL " in text, text


# -- resume ---------------------------------------------------------------------------------------


def test_resume_with_a_changed_key_is_refused_and_the_run_is_untouched(cli_in_process, density_run):
    run_cli = cli_in_process
    args = ["train", "--out", density_run, "--resume", "--set=flow.k=8", "--set=train.steps=99"]
    line = refused(run_cli, density_run.parent, args)
    assert "flow.k (stored 2, asked 8)" in line and "train.steps (stored 30, asked 99)" in line


def test_resume_with_another_config_file_is_refused(cli_in_process, density_run):
    run_cli = cli_in_process
    args = ["train", "--config", "energy", "--out", density_run, "--resume"]
    refused(run_cli, density_run.parent, args, "flow.k (stored 2, asked 32)")


def test_resume_stopped_at_a_random_step_ends_bit_exact(tmp_path, spawn_cli, cli_in_process):
    """SIGTERM at a seeded random moment to a real process, then `train --out RUN --resume` and
    nothing else: the stored config (its cosine schedule over train.steps) is continued
    exactly."""
    steps = 400
    cfg = [*TINY, f"train.steps={steps}", "train.log_every=1"]
    ref = tmp_path / "reference"
    train(load_config("energy", cfg), ref, progress=False, tensorboard=False)

    run = tmp_path / "stopped"
    metrics = run / "metrics.jsonl"
    args = ["train", "--config", "energy", *sets(*cfg), "--out", run, "--no-progress"]
    proc = spawn_cli(*args, ready=lambda: metrics.exists() and metrics.stat().st_size > 0)
    time.sleep(random.Random(33).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    stopped = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    assert proc.returncode == 128 + signal.SIGTERM and 0 < stopped < steps, (stopped, stderr)

    done = cli_in_process("train", "--out", run, "--resume", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    a = checkpoint.load(ref / "checkpoints" / "last.pt")
    b = checkpoint.load(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == steps
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), (key, stopped)
    assert a["schedule"] == b["schedule"]
    # config.yaml, run.json and the checkpoint agree on the run's length
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == steps
    assert json.loads((run / "run.json").read_text())["steps"] == steps
    print(f"stopped at step {stopped} of {steps}")


# -- output paths ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(density_run) -> Path:
    proc = invoke_cli("eval", density_run / "checkpoints" / "best.pt", "--samples", "200")
    assert proc.returncode == 0, proc.stderr
    return density_run


@pytest.mark.parametrize(
    "where, needles",
    [("folder", ["is a folder", "--out"]), ("no-parent", ["does not exist"])],
)
def test_report_out_must_be_a_file_in_an_existing_folder(
    evaluated, cli_in_process, tmp_path, where, needles
):
    run_cli = cli_in_process
    (tmp_path / "existing").mkdir()
    out = tmp_path / ("existing" if where == "folder" else "missing/report.md")
    refused(run_cli, tmp_path, ["report", evaluated, "--out", out], *needles)


def test_report_plot_given_a_folder_is_refused(evaluated, cli_in_process, tmp_path):
    run_cli = cli_in_process
    (tmp_path / "pictures").mkdir()
    refused(run_cli, tmp_path, ["report", evaluated, "--plot", "pictures"], "is a folder")


@pytest.mark.parametrize("command", ["report", "sample"])
def test_output_in_a_read_only_place(evaluated, cli_in_process, tmp_path, command):
    run_cli = cli_in_process
    folder = unwritable_folder(tmp_path)
    target = folder / "out.png"
    what = [evaluated] if command == "report" else [evaluated / "checkpoints" / "best.pt"]
    line = refused(run_cli, tmp_path, [command, *what, "--out", target], "cannot write to")
    assert str(folder) in line and not target.exists()


@pytest.mark.parametrize("where", ["folder", "no-parent"])
def test_sample_out_must_be_a_file_in_an_existing_folder(
    density_run, cli_in_process, tmp_path, where
):
    run_cli = cli_in_process
    (tmp_path / "grid.png").mkdir()
    out = "grid.png" if where == "folder" else "missing/grid.png"
    args = ["sample", density_run / "checkpoints" / "best.pt", "--out", out]
    refused(run_cli, tmp_path, args, "is a folder" if where == "folder" else "does not exist")


def _refuses_huge_allocations() -> bool:
    """Whether the kernel refuses an allocation far beyond RAM + swap at once (overcommit mode
    0 and under 64 GiB): elsewhere an 80 GB request may succeed, or wake the OOM killer."""
    try:
        mode = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return False
    return mode == "0" and total < 64 * 2**30


@pytest.mark.skipif(not _refuses_huge_allocations(), reason="huge allocations may not fail here")
def test_a_sample_count_that_cannot_be_allocated(density_run, run_cli, tmp_path):
    args = ["sample", density_run / "checkpoints" / "best.pt", "--n", "10000000000"]
    refused(run_cli, tmp_path, [*args, "--out", "z.npz"], "out of memory", "GiB", "--n")


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, runner",
    [
        ("truncated", "run_cli"),  # one in a fresh process, the others in this one
        ("text", "cli_in_process"),
        ("npz", "cli_in_process"),
        ("empty", "cli_in_process"),
    ],
)
def test_damaged_or_foreign_checkpoints_say_what_is_wrong(
    density_run, request, tmp_path, kind, runner
):
    run_cli = request.getfixturevalue(runner)
    good = (density_run / "checkpoints" / "last.pt").read_bytes()
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("step: 3\n")
    elif kind == "npz":
        with open(path, "wb") as fh:
            np.savez(fh, x=np.zeros(3))
    else:
        path.write_bytes(b"")
    expected = {
        "truncated": "truncated",
        "text": "not a zip archive",
        "npz": "not a torch checkpoint (it holds x.npy)",
        "empty": "empty",
    }[kind]
    line = refused(run_cli, tmp_path, ["eval", path], str(path), expected)
    for internal in ("pop from empty list", "Unsupported operand", "Errno", "hasRecord"):
        assert internal not in line


# -- options that do not apply --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, option",
    [
        (["eval", "{ckpt}", "--iw-samples", "5"], "--iw-samples"),
        (["eval", "{ckpt}", "--split", "valid"], "--split"),
        (["sample", "{ckpt}", "--reconstruct", "--out", "r.png"], "--reconstruct"),
    ],
)
def test_options_for_vae_runs_are_refused_on_a_density_checkpoint(
    evaluated, cli_in_process, args, option
):
    run_cli = cli_in_process
    ckpt = str(evaluated / "checkpoints" / "best.pt")
    args = [ckpt if a == "{ckpt}" else a for a in args]
    refused(run_cli, evaluated.parent, args, option, "does not apply to a density checkpoint")


def test_samples_option_is_refused_on_a_vae_checkpoint(vae_run, cli_in_process):
    run_cli = cli_in_process
    args = ["eval", vae_run / "checkpoints" / "best.pt", "--samples", "10"]
    refused(run_cli, vae_run.parent, args, "--samples", "does not apply to a vae checkpoint")


# -- what works -----------------------------------------------------------------------------------


def test_eval_records_its_result_where_report_finds_it(density_run, cli_in_process, tmp_path):
    run_cli = cli_in_process
    ckpt = density_run / "checkpoints" / "best.pt"
    proc = run_cli("eval", ckpt, "--samples", "300", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert json.loads((density_run / "eval.json").read_text()) == printed
    assert "recorded in" in proc.stderr
    report = run_cli("report", density_run.parent, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert f"{printed['kl']:.4f}" in report.stdout


def test_eval_merges_sample_sizes_as_sweep_does(vae_run, cli_in_process):
    run_cli = cli_in_process
    ckpt = vae_run / "checkpoints" / "best.pt"
    common = ["--limit", "20", "--json"]
    first = run_cli("eval", ckpt, "--iw-samples", "5", *common)
    second = run_cli("eval", ckpt, "--iw-samples", "10", *common)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    recorded = json.loads((vae_run / "eval.json").read_text())
    assert recorded["iw_samples"] == 5 and recorded["nll"] == json.loads(first.stdout)["nll"]
    assert recorded["by_samples"]["10"]["nll"] == json.loads(second.stdout)["nll"]
    # another split replaces the file: its numbers are of other images
    valid = run_cli("eval", ckpt, "--iw-samples", "5", "--split", "valid", *common)
    assert valid.returncode == 0, valid.stderr
    recorded = json.loads((vae_run / "eval.json").read_text())
    assert recorded["split"] == "valid" and "by_samples" not in recorded


def test_sample_on_a_vae_draws_a_grid_of_64(vae_run, cli_in_process, tmp_path):
    run_cli = cli_in_process
    ckpt = vae_run / "checkpoints" / "best.pt"
    proc = run_cli("sample", ckpt, "--out", tmp_path / "s.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "s.npz")["z"].shape[0] == 64


# -- small ones -----------------------------------------------------------------------------------


def test_help_shows_no_bool_metavar_and_plain_argument_names(cli_in_process, tmp_path):
    run_cli = cli_in_process
    proc = run_cli("eval", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout and "{checkpoint}" not in proc.stdout
    assert "[OPTIONS] CHECKPOINT" in proc.stdout


def test_keys_lists_the_allowed_values(cli_in_process, tmp_path):
    run_cli = cli_in_process
    proc = run_cli("keys", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.replace("│", " ").split())  # a wrapped cell, joined again
    for choices in (
        "adam, rmsprop",
        "constant, cosine",
        "maxout, relu, tanh, softplus, elu",
        "standard, diagonal",
        "auto, cpu, cuda",
        "dynamic, static",
    ):
        assert f"one of: {choices}" in text, choices


def test_configs_descriptions_end_at_the_end_of_a_sentence():
    for name, path in shipped_configs().items():
        text = _first_comment(path)
        assert text.endswith("."), (name, text)
    assert SHIPPED.is_dir()


def test_eval_table_title_is_never_wrapped_mid_path(density_run, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "checkpoints"
    deep.mkdir(parents=True)
    ckpt = deep / "best.pt"
    ckpt.write_bytes((density_run / "checkpoints" / "best.pt").read_bytes())
    result = CliRunner().invoke(app, ["eval", str(ckpt), "--samples", "200"], terminal_width=60)
    assert result.exit_code == 0, result.output
    assert str(ckpt) in result.stdout.splitlines()


def test_nothing_is_left_in_the_current_folder_by_a_refused_train(cli_in_process, tmp_path):
    """A resumed run that is not there: one line, and no folder made for it."""
    run_cli = cli_in_process
    refused(run_cli, tmp_path, ["train", "--out", "nothing-here", "--resume"], "no checkpoint")
    assert not os.path.exists(tmp_path / "nothing-here")


def test_a_sweep_that_fails_at_once_leaves_no_folder(run_cli, tmp_path):
    args = ["sweep", "--config", "mnist_quick", "--out", "grid", "--no-progress"]
    proc = run_cli(*args, *sets(f"data.root={tmp_path}", "data.download=false"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
