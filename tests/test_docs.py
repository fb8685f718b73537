"""The examples of docs/extending.md and docs/api.md, run as written, so the docs cannot go stale.

A fenced block whose first line is ``# file: NAME`` is written to NAME; ``python`` blocks run in
order (consecutive ones in one process, sharing their names), and each ``flowvae ...`` line of a
``bash`` block runs as ``python -m flowvae ...``, each in a process of its own (forked from
tests/forkserver.py's server, which saves the interpreter's start), all in one fresh folder with
MNIST in $FLOWVAE_DATA. VAE training commands run for a few updates of a small model instead of
minutes (SHRINK): the flags are the doc's, only the length differs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
SHRINK = [
    "--set", "train.steps=20", "--set", "train.eval_every=20", "--set", "model.hidden=[32]",
    "--set", "data.valid_size=500",
]  # fmt: skip


def steps(doc: Path, folder: Path) -> list[tuple[str, str | list[str]]]:
    """The doc's files written to ``folder``; what remains to run, in order: ("python", code)
    or ("flowvae", argv)."""
    todo: list[tuple[str, str | list[str]]] = []
    for lang, body in FENCE.findall(doc.read_text(encoding="utf-8")):
        first = body.splitlines()[0]
        if first.startswith("# file: "):
            (folder / first.removeprefix("# file: ").strip()).write_text(body, encoding="utf-8")
        elif lang == "python":
            if todo and todo[-1][0] == "python":
                todo[-1] = ("python", todo[-1][1] + "\n" + body)
            else:
                todo.append(("python", body))
        elif lang == "bash":
            for line in body.splitlines():
                if line.startswith("flowvae "):
                    argv = shlex.split(line)[1:]
                    if argv[0] == "train" and "mnist" in line:
                        argv += SHRINK
                    todo.append(("flowvae", argv))
    return todo


def run_doc(doc: Path, folder: Path, mnist_dir: Path, server: ForkServer) -> list[str]:
    """Run the doc's examples in ``folder``; the stdout of each step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FLOWVAE_DATA=str(mnist_dir), COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    outputs = []
    for kind, what in steps(doc, folder):
        code, args = (what, None) if kind == "python" else (None, what)
        proc = server.run(args, code=code, cwd=folder, env=env, timeout=900)
        assert proc.returncode == 0, f"{kind} {what}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        outputs.append(proc.stdout)
    return outputs


@pytest.mark.slow
def test_extending_md_runs_and_its_numbers_hold(tmp_path, mnist_dir, fork_server):
    doc = ROOT / "docs" / "extending.md"
    outputs = run_doc(doc, tmp_path, mnist_dir, fork_server())
    printed = next(json.loads(o) for o in outputs if o.startswith("{"))
    assert printed["flow"] == f"{tmp_path / 'myflows.py'}:ElementwiseAffine"
    quoted = re.search(r"KL\(q‖p\) = ([\d.]+) ± ([\d.]+) nats", doc.read_text()).groups()
    assert round(printed["kl"], 2) == float(quoted[0]), printed
    assert round(printed["kl_stderr"], 2) == float(quoted[1]), printed
    assert (tmp_path / "affine.png").stat().st_size > 0
    for run in ("vae-affine", "vae-affine-global", "ring"):
        assert (tmp_path / "runs" / run / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_api_md_runs(tmp_path, mnist_dir, fork_server):
    run_doc(ROOT / "docs" / "api.md", tmp_path, mnist_dir, fork_server())
    assert (tmp_path / "runs" / "mnist" / "checkpoints" / "best.pt").is_file()


def test_the_docs_have_examples_to_run(tmp_path):
    """The harness finds what it should (a cheap guard against a renamed fence or marker)."""
    todo = steps(ROOT / "docs" / "extending.md", tmp_path)
    assert (tmp_path / "myflows.py").is_file() and (tmp_path / "affine.yaml").is_file()
    assert (tmp_path / "mytargets.py").is_file()
    commands = [argv for kind, argv in todo if kind == "flowvae"]
    assert ["train", "--config", "affine.yaml", "--out", "runs/affine", "--no-progress"] in commands
    assert sum(kind == "python" for kind, _ in todo) == 2
    assert [kind for kind, _ in steps(ROOT / "docs" / "api.md", tmp_path)] == ["python"]
