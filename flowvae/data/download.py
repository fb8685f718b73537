"""Download a file from a list of mirrors, verify its checksum, move it into place atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

__all__ = [
    "MNIST_MIRRORS",
    "DownloadError",
    "ensure_file",
    "fetch",
    "file_digest",
    "one_line",
    "sha256_of",
]

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


def one_line(text: object) -> str:
    """``text`` with its whitespace (newlines too) folded into single spaces."""
    return " ".join(str(text).split())


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the data folder {folder} ({one_line(e)}) — "
            "choose a writable folder (e.g. set FLOWVAE_DATA)"
        ) from None
    return created


def _remove_empty(created: list[Path]) -> None:
    """Undo :func:`_make_folder` after a failed download: a missing dataset leaves no folder."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was put there meanwhile): keep it
            return


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file (``algorithm``: any hashlib name, e.g. sha256 or md5), in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA256 of a file, read in chunks."""
    return file_digest(path, "sha256")


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


def _download_once(url: str, tmp, timeout: float, progress: bool, label: str, algorithm: str):
    """Stream ``url`` into the open file ``tmp``; return the hex digest of what was written."""
    h = hashlib.new(algorithm)
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
    algorithm: str = "sha256",
) -> Path:
    """Download ``filename`` into ``folder`` from the first mirror that serves a good copy.

    Each mirror is a base URL (``filename`` is appended). The file is written to a
    temporary file in ``folder``, checked against the hex digest ``sha256`` (of ``algorithm``,
    SHA256 unless told otherwise; skipped when None) and
    only then renamed into place with :func:`os.replace`, so ``folder`` never holds a
    partial or unverified ``filename``. A failed mirror (network error, HTTP error,
    checksum mismatch) falls through to the next; when all fail a
    :class:`DownloadError` (a :class:`DataError`) is raised with a one-line message.
    """
    folder = Path(folder).expanduser()
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    created = _make_folder(folder)  # only now, when a download starts
    try:
        return _fetch_into(folder, filename, sha256, mirrors, progress, timeout, algorithm)
    except BaseException:
        _remove_empty(created)
        raise


def _fetch_into(
    folder: Path,
    filename: str,
    sha256: str | None,
    mirrors: Sequence[str],
    progress: bool,
    timeout: float,
    algorithm: str,
) -> Path:
    """:func:`fetch` into the existing ``folder``."""
    target = folder / filename
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
                f"cannot write into the data folder {folder} ({one_line(e)}) — "
                "choose a writable folder (e.g. set FLOWVAE_DATA)"
            ) from None
        tmp_path = Path(tmp.name)
        try:
            try:
                with tmp:
                    digest = _download_once(url, tmp, timeout, progress, filename, algorithm)
            except urllib.error.HTTPError as e:
                reasons.append(f"{url}: HTTP {e.code} {one_line(e.reason)}")
                continue
            except urllib.error.URLError as e:
                reasons.append(f"{url}: {one_line(e.reason)}")
                continue
            except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
                reasons.append(f"{url}: {one_line(e) or type(e).__name__}")
                continue
            if sha256 is not None and digest != sha256.lower():
                checksum_failed = True
                reasons.append(
                    f"{url}: {algorithm.upper()} mismatch (expected {sha256}, got {digest})"
                )
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


def ensure_file(
    filename: str,
    folder: str | os.PathLike[str],
    digest: str,
    *,
    title: str,
    mirrors: Sequence[str],
    algorithm: str = "sha256",
    download: bool = True,
    progress: bool = True,
) -> Path:
    """``folder/filename``, checked against its hex ``digest``, downloaded first if missing.

    A present file with another digest, a missing one with downloading off, and a failed
    download are each one-line :class:`DataError`s naming the file and the folder (``title``
    names the dataset in them).
    """
    folder = Path(folder).expanduser()
    path = folder / filename
    if path.is_file():
        found = file_digest(path, algorithm)
        if found != digest.lower():
            raise DataError(
                f"{path} has a checksum mismatch ({algorithm.upper()} {found}, expected "
                f"{digest}) — delete it to re-download, or replace it with a good copy"
            )
        return path
    hint = "or set FLOWVAE_DATA to a folder that has it"
    if not download:
        raise DataError(
            f"{title} is not in {folder} and downloading is off: put {filename} there, {hint}, "
            "or allow downloading"
        )
    try:
        return fetch(filename, folder, digest, mirrors, progress=progress, algorithm=algorithm)
    except DownloadError as e:
        if e.checksum_failed:
            raise
        last = e.reasons[-1] if e.reasons else "no mirrors given"
        raise DataError(
            f"{title} is not in {folder} and could not be downloaded (no network? {last}): "
            f"put {filename} there, {hint}"
        ) from None
