"""Files a command writes (`report --out/--plot/--figure`, `sample --out`): checked before any
work is done, so that a folder given as a file, a missing folder or a read-only place is one
line and nothing is written, and a write that still fails is one line too."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowvae.errors import ConfigError


def check_output_file(path: Path, option: str, example: str) -> None:
    """Refuse ``path`` for ``option`` unless a file can be written there; ``example`` is a file
    name to suggest when ``path`` is a folder (e.g. "figure.png")."""
    if path.is_dir():
        raise ConfigError(
            f"{option} {path} is a folder — give a file name, e.g. {option} {path / example}"
        )
    parent = path.parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise ConfigError(
            f"{option} {path}: the folder {parent} {what} — create it first, or choose another "
            "place"
        )
    probe = parent / f".{path.name}.probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{option} {path}: cannot write to {parent} ({exc.strerror or exc}) — choose "
            "another place"
        ) from None


@contextmanager
def writing(path: Path, option: str) -> Iterator[None]:
    """A write to ``path`` that fails anyway (disk full, a mount lost) as one line."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(
            f"{option} {path}: could not write it ({exc.strerror or exc}) — free some space or "
            "choose another place"
        ) from None
