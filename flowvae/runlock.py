"""One writer per run folder: an exclusive OS lock on ``RUN/.lock`` for every writing command.

Two processes writing into one run folder (two ``train --resume``, a sweep and a manual run)
would interleave checkpoints and metrics into a run that belongs to neither. The lock is
``flock(LOCK_EX | LOCK_NB)``: the kernel drops it when its holder exits, however it dies
(SIGKILL, OOM killer, power loss), so a crash never leaves a folder locked. A marker-file
protocol would need someone to decide when a marker is stale; a kernel lock never is.

The lock file stays in place (unlinking it would let a second writer lock a fresh inode while
the first still holds the old one). While held it contains one JSON line naming the holder,
so the refused writer's error can say who is writing.

Within one process the lock is re-entrant: a sweep may hold a run folder while it calls
``train`` on it. Where ``fcntl`` does not exist (Windows) or the filesystem refuses locks
(ENOLCK on some network mounts), ``hold_run_folder`` only creates the folder and does not lock.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowvae.errors import ConfigError, RunFolderBusy

try:
    import fcntl
except ImportError:  # Windows: no flock; run folders are not locked there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


@dataclass
class _Hold:
    fd: int
    pid: int  # the process that took it: a forked child must not clear the holder line
    depth: int = 1


_held: dict[Path, _Hold] = {}  # resolved folder -> this process's hold on it
_unlocked: set[Path] = set()  # resolved folders "held" without a lock (no flock there)
_registry = threading.Lock()


@contextmanager
def hold_run_folder(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``out_dir``'s write lock for the ``with`` block; create the folder if needed.

    Raises ``RunFolderBusy`` (exit code 2, one line naming the holder's pid) when another
    process holds it, at once rather than waiting: a writer that queued behind another would
    then write into a run that has changed under it. Nested use in one process is a no-op.
    """
    folder = Path(out_dir)
    _make_folder(folder)
    key = folder.resolve()
    with _registry:
        hold = _held.get(key)
        if hold is not None:
            hold.depth += 1
        else:
            hold = _held[key] = _Hold(_acquire(folder), os.getpid())
    try:
        yield folder
    finally:
        with _registry:
            hold.depth -= 1
            if hold.depth == 0:
                del _held[key]
                _release(hold)


def holder(out_dir: str | Path) -> dict[str, Any] | None:
    """The live process recorded as holding ``out_dir`` (``{"pid", "command", ...}``), else None.

    Read-only, for reports such as ``flowvae verify``: it never takes the lock, so it cannot
    make a writer that starts at the same moment fail. A recorded pid that no longer runs is
    not a holder (the lock died with it).
    """
    try:
        info = _parse(Path(out_dir, LOCK_NAME).read_bytes())
    except OSError:
        return None
    pid = info.get("pid")
    return info if isinstance(pid, int) and pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as existing)."""
    if pid <= 0:  # kill(0, ...) and kill(-1, ...) address process groups, not one process
        return False
    if os.name != "posix":  # os.kill would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # same wording as the trainer's own write check
        raise ConfigError(
            f"cannot write to the output folder {folder} ({exc.strerror or exc}) — choose "
            "another with --out"
        ) from None


def _acquire(folder: Path) -> int:
    """Open and lock ``folder/.lock``; return its descriptor, which keeps the lock alive."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output folder {folder} ({exc.strerror or exc}) — choose "
            "another with --out"
        ) from None
    if fcntl is None:
        _unlocked.add(folder.resolve())
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _wait_for_holder_line(fd)
        os.close(fd)
        raise RunFolderBusy(_busy_message(folder, info)) from None
    except OSError:  # ENOLCK and kin: this filesystem cannot lock; run unlocked, as on Windows
        _unlocked.add(folder.resolve())
        return fd
    _write_holder_line(fd)
    return fd


def _release(hold: _Hold) -> None:
    """Clear the holder line, then close: closing the last descriptor drops the lock.

    No explicit LOCK_UN: the lock belongs to the open file, which a forked child (a data
    loader worker) shares; unlocking from there would unlock the parent too.
    """
    try:
        if hold.pid == os.getpid():
            os.ftruncate(hold.fd, 0)
    except OSError:
        pass
    finally:
        os.close(hold.fd)


def _write_holder_line(fd: int) -> None:
    line = json.dumps(
        {"pid": os.getpid(), "command": _command(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
    except OSError:  # the lock holds regardless; only the refused writer's message is poorer
        pass


def _wait_for_holder_line(fd: int, seconds: float = 0.2) -> dict[str, Any]:
    """The holder's line; a holder that locked a moment ago may not have written it yet."""
    deadline = time.monotonic() + seconds
    while True:
        info = _parse(os.pread(fd, 4096, 0))
        if info or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw.decode("utf-8", "replace").splitlines()[0])
    except (ValueError, IndexError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy_message(folder: Path, info: dict[str, Any]) -> str:
    pid = info.get("pid", "unknown")
    command = str(info.get("command") or "").replace("\n", " ")
    what = f"pid {pid}" + (f": {command[:120]}" if command else "")
    return (
        f"{folder} is being written by another flowvae process ({what}) — wait for it to "
        "finish, or choose another --out"
    )


def _command() -> str:
    """The command line as the user typed it (``flowvae train ...``), for the busy message."""
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name
    if argv[0] == "__main__.py":  # python -m flowvae
        argv[0] = "flowvae"
    return " ".join(argv)


# -- handing a held lock to a child process ---------------------------------------------------


def held_descriptor(out_dir: str | Path) -> int | None:
    """The descriptor of this process's lock on ``out_dir`` (None when it holds none), for a
    parallel sweep to pass to the worker process it starts on that run (``subprocess``'s
    ``pass_fds``): the lock belongs to the open file, so parent and worker then hold it
    together, and no third process can take the folder between the two."""
    with _registry:
        hold = _held.get(Path(out_dir).resolve())
    return None if hold is None else hold.fd


def adopt(out_dir: str | Path, fd: int) -> None:
    """Count the inherited descriptor ``fd`` as this process's hold on ``out_dir`` (a worker
    of a parallel sweep), so that ``hold_run_folder`` there nests in it instead of being
    refused by its own parent. The worker never clears the holder line: its parent does."""
    folder = Path(out_dir)
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(folder / LOCK_NAME))
    except OSError:
        same = False
    if not same:
        raise ConfigError(
            f"descriptor {fd} is not the lock of {folder} — start the run with `flowvae sweep`"
        )
    with _registry:
        _held[folder.resolve()] = _Hold(fd, pid=-1, depth=1)


def unlocked(out_dir: str | Path) -> bool:
    """Whether this process's hold on ``out_dir`` came without a lock (Windows, or a mount
    that refuses flock, e.g. Lustre with -o noflock): other writers are not kept out there."""
    return Path(out_dir).resolve() in _unlocked
