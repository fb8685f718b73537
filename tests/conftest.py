"""Shared pytest setup: import the package from the checkout, skip CUDA tests without a GPU, and
fixtures for the real MNIST files and for running the real ``flowvae`` CLI in a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The real MNIST files: $FLOWVAE_TEST_DATA, else the repo root's sibling shared/data/mnist
#: (the same rule as tests/test_mnist.py).
MNIST_DIR = Path(os.environ.get("FLOWVAE_TEST_DATA") or ROOT.parent / "shared" / "data" / "mnist")


# The tests' tensors are small: on a 2-core machine, intra-op threads only add contention.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (holds configs/), whatever the current directory is."""
    return ROOT


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with the four real MNIST .gz files; skips the test when they are absent."""
    from flowvae.data.mnist import FILES

    missing = [name for name in FILES if not (MNIST_DIR / name).is_file()]
    if missing:
        pytest.skip(f"MNIST files not found in {MNIST_DIR}: {', '.join(missing)}")
    return MNIST_DIR


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """``build(folder)`` once per test session, even under pytest-xdist, where a module's tests
    (and so its module-scoped fixture) may be split between workers: the first worker to come
    here builds into a folder the session's workers share, under a lock; the others wait for it
    and get the same folder. Only for what the tests then read, not write."""
    shared = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    root = tmp_path_factory.getbasetemp()
    root = root.parent if shared else root  # the session's folder, above each worker's own
    folder = root / f"built-once-{name}"
    with open(root / f"built-once-{name}.lock", "w") as lock:
        if shared:
            import fcntl  # POSIX; one pytest process needs no lock

            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".built").exists():  # not built, or a build that failed
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("FLOWVAE_DATA", None)
    env["COLUMNS"] = "200"
    return env


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=..., timeout=...)``: ``python -m flowvae ARGS`` in a subprocess, the
    CompletedProcess (text) back. Pass ``cwd`` (e.g. tmp_path) so that nothing depends on, or
    lands in, pytest's current directory."""

    def run(*args: str | Path, cwd: str | Path | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "flowvae", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=str(cwd) if cwd is not None else None,
            env=_cli_env(),
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def fork_server():
    """The session's :class:`forkserver.ForkServer` (started at its first use), as a function."""
    server: ForkServer | None = None

    def get() -> ForkServer:
        nonlocal server
        if server is None:
            server = ForkServer(_cli_env(), ROOT)
        return server

    yield get
    if server is not None:
        server.close()


@pytest.fixture
def forked_cli(fork_server):
    """``forked_cli(*args, cwd=..., env=..., timeout=...)``: ``run_cli`` for a command that needs
    a process of its own but not the ~3.5 s interpreter and torch start-up: ``flowvae ARGS`` in
    a child forked from a server that imported them (tests/forkserver.py)."""

    def run(*args: str | Path, cwd=None, env: dict | None = None, timeout: float = 300):
        return fork_server().run(list(args), cwd=cwd, env=env, timeout=timeout)

    return run


@pytest.fixture
def spawn_cli(fork_server):
    """``spawn_cli(*args, ready=fn)``: ``flowvae ARGS`` started in a process (and process group)
    of its own, forked from the fork server (stderr kept, as ``communicate()[1]``), returned once
    ``ready()`` is true; killed with its group at teardown."""
    procs: list = []

    def spawn(*args: str | Path, ready):
        proc = fork_server().start(list(args), cwd=ROOT, keep_stdout=False)
        procs.append(proc)
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "not ready in 180 s"
            time.sleep(0.05)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def invoke_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """The CLI (the Typer app, its error handling and exit codes) run in this process, without
    the ~3 s interpreter and torch start-up of ``run_cli``; a CompletedProcess-like result."""
    from typer.testing import CliRunner

    from flowvae.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli_in_process(monkeypatch):
    """``cli_in_process(*args, cwd=...)``: :func:`invoke_cli` in ``cwd``, with FLOWVAE_DATA unset
    (both undone after the test)."""

    def run(*args: str | Path, cwd: str | Path | None = None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.delenv("FLOWVAE_DATA", raising=False)
        return invoke_cli(*args)

    return run
