"""Download a file from a list of mirrors, verify its SHA256, move it into place atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

__all__ = ["MNIST_MIRRORS", "DownloadError", "fetch", "sha256_of"]

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_CHUNK = 1 << 20


class DownloadError(DataError):
    """No mirror delivered the file; ``checksum_failed`` says whether any delivered a bad copy."""

    def __init__(self, message: str, reasons: list[str], checksum_failed: bool) -> None:
        super().__init__(message)
        self.reasons = reasons
        self.checksum_failed = checksum_failed


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


def _download_once(url: str, tmp, timeout: float, progress: bool, label: str):
    """Stream ``url`` into the open file ``tmp``; return the hex SHA256 of what was written."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with _progress(progress) as bar:
            task = bar.add_task(label, total=total)
            while chunk := response.read(_CHUNK):
                tmp.write(chunk)
                h.update(chunk)
                bar.advance(task, len(chunk))
    return h.hexdigest()


def fetch(
    filename: str,
    folder: str | os.PathLike[str],
    sha256: str | None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download ``filename`` into ``folder`` from the first mirror that serves a good copy.

    Each mirror is a base URL (``filename`` is appended). The file is written to a
    temporary file in ``folder``, checked against ``sha256`` (skipped when None) and
    only then renamed into place with :func:`os.replace`, so ``folder`` never holds a
    partial or unverified ``filename``. A failed mirror (network error, HTTP error,
    checksum mismatch) falls through to the next; when all fail a
    :class:`DownloadError` (a :class:`DataError`) is raised with a one-line message.
    """
    folder = Path(folder).expanduser()
    target = folder / filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the data folder {folder} ({_one_line(e)}) — "
            "choose a writable folder (e.g. set FLOWVAE_DATA)"
        ) from None

    if isinstance(mirrors, str):
        mirrors = [mirrors]
    reasons: list[str] = []
    checksum_failed = False
    for mirror in mirrors:
        url = mirror if mirror.endswith("/") else mirror + "/"
        url += filename
        try:
            tmp = tempfile.NamedTemporaryFile(
                dir=folder, prefix=f".{filename}.", suffix=".part", delete=False
            )
        except OSError as e:
            raise DataError(
                f"cannot write into the data folder {folder} ({_one_line(e)}) — "
                "choose a writable folder (e.g. set FLOWVAE_DATA)"
            ) from None
        tmp_path = Path(tmp.name)
        try:
            try:
                with tmp:
                    digest = _download_once(url, tmp, timeout, progress, f"{filename}")
            except urllib.error.HTTPError as e:
                reasons.append(f"{url}: HTTP {e.code} {_one_line(e.reason)}")
                continue
            except urllib.error.URLError as e:
                reasons.append(f"{url}: {_one_line(e.reason)}")
                continue
            except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
                reasons.append(f"{url}: {_one_line(e) or type(e).__name__}")
                continue
            if sha256 is not None and digest != sha256.lower():
                checksum_failed = True
                reasons.append(f"{url}: SHA256 mismatch (expected {sha256}, got {digest})")
                continue
            os.replace(tmp_path, target)
            return target
        finally:
            tmp_path.unlink(missing_ok=True)  # gone already after a successful os.replace

    if checksum_failed:
        head = f"no mirror served a good copy of {filename}"
    else:
        head = f"{filename} could not be downloaded (no network?)"
    detail = "; ".join(reasons) if reasons else "no mirrors given"
    raise DownloadError(
        f"{head} [{detail}] — put {filename} into {folder} by hand, "
        "or set FLOWVAE_DATA to a folder that has it",
        reasons,
        checksum_failed,
    )
