"""The package as a user gets it from `pip install`: built into a wheel, installed into a fresh
environment, and run from a folder outside the checkout, where only the shipped configs by name
are there to start from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd: Path, timeout: float = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def borrowed_site_folders() -> list[str]:
    """This interpreter's site-packages folders (a venv's own, and those it inherits), not the
    checkout: the installed wheel must be what the new environment imports."""
    found = [
        p
        for p in sys.path
        if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()
    ]
    return list(dict.fromkeys(found))


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info folders.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "flowvae", src / "flowvae", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        dist,
        src,
        cwd=tmp_path,
    )
    wheel = next(dist.glob("flowvae-*.whl"))

    # A fresh environment that borrows torch & co. from this one (no downloads), with the wheel.
    # Not `venv --system-site-packages`: inside a virtual environment that would borrow the base
    # interpreter's packages, not this environment's. A .pth file lists this interpreter's own
    # site folders instead, after the new environment's (so its flowvae wins).
    # Without a pip of its own (ensurepip takes seconds): this pip installs into it (--python).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python, flowvae = venv / "bin" / "python", venv / "bin" / "flowvae"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path)
    Path(site.strip(), "_borrowed_from_outer_env.pth").write_text(
        "".join(f"{p}\n" for p in borrowed_site_folders())
    )
    pip = [sys.executable, "-m", "pip", "--python", python]
    run(*pip, "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import flowvae; print(flowvae.__file__)", cwd=elsewhere)
    assert where.strip().startswith(str(venv)), where  # the installed copy, not the checkout

    listed = run(flowvae, "configs", cwd=elsewhere)
    assert "energy" in listed and "mnist_quick" in listed
    assert "experiment: density" in run(flowvae, "configs", "energy", cwd=elsewhere)
    run(
        flowvae,
        "train",
        "--config",
        "energy",
        "--set",
        "train.steps=50",
        "--set",
        "flow.k=4",
        "--out",
        "run",
        "--no-progress",
        cwd=elsewhere,
    )
    result = json.loads(
        run(
            flowvae, "eval", "run/checkpoints/best.pt", "--json", "--samples", "2000", cwd=elsewhere
        )
    )
    assert result["kind"] == "density" and result["step"] == 50 and result["kl"] > 0
