"""Checkpoints: written atomically (temp file, fsync, rename), verified by a digest, read with
``weights_only=True``.

A checkpoint holds the model and optimiser state, the step, the RNG states, the resolved config,
the best validation score so far and the package version, under a schema number.

File format (schema 2). The file is exactly what ``torch.save(ckpt)`` writes (a zip archive),
with a zip archive comment ``flowvae-sha256:<64 hex>`` appended: the SHA-256 of every byte
before the comment. Zip readers accept a comment, so ``torch.load(path, weights_only=True)``
still returns the checkpoint dict unchanged. The digest covers the whole file, zip headers and
padding included, so a single flipped bit anywhere is caught; ``torch.load`` alone misses most
of them (it does not check the archive's CRCs), and a damaged tensor would load silently. It is
checked before the bytes are unpickled. Schema-1 files (written before digests) have no
comment; they still load, reported as "legacy" by ``verify``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from flowvae import __version__
from flowvae.errors import CheckpointError

SCHEMA = 2
LEGACY_SCHEMAS = (1,)  # readable, but written without a digest
REQUIRED = ("schema", "model", "step", "config")

_TAG = b"flowvae-sha256:"
_TRAILER_LEN = len(_TAG) + 64  # the zip comment: tag + hex digest
_EOCD_SIG = b"PK\x05\x06"  # the zip "end of central directory" record: 22 bytes + comment
_EOCD_LEN = 22
_CHUNK = 1 << 20
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # what _temp_path names
_FIX = (
    "it was damaged after it was written (disk, copy or sync); use another checkpoint "
    "(flowvae verify RUN lists the intact ones) or copy it again"
)


# -- writing --------------------------------------------------------------------------------------


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save (plus the digest) to a temporary file beside ``path``, fsync it, then rename
    over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """

    def write(fh: IO[bytes]) -> None:
        torch.save(obj, fh)
        _append_digest(fh)

    _write_atomic(Path(path), write)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace a text file (config.yaml, run.json, eval.json, a metrics.jsonl rewrite) so a
    crash leaves the old contents or the new ones, never a truncated file."""
    data = text.encode(encoding)
    _write_atomic(Path(path), lambda fh: fh.write(data))


def make_checkpoint(**fields: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "version": __version__, **fields}


def _temp_path(path: Path) -> Path:
    # Hidden, beside the target (a rename is atomic only within one filesystem), and named
    # after the writer's pid so remove_stale_temps can tell a dead writer's leftovers.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "w+b") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (without it a power cut may undo the rename)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not supported everywhere (Windows); the data itself is already synced
        pass


def _append_digest(fh: IO[bytes]) -> None:
    """Turn the zip archive torch.save wrote to ``fh`` into one whose comment is its digest."""
    end = fh.seek(0, os.SEEK_END)
    fh.seek(end - _EOCD_LEN)
    eocd = fh.read(_EOCD_LEN)
    if eocd[:4] != _EOCD_SIG or eocd[20:] != b"\0\0":
        raise RuntimeError("torch.save wrote no plain zip archive; cannot add the digest")
    fh.seek(end - 2)  # the comment length: part of the digested bytes, so set it first
    fh.write(_TRAILER_LEN.to_bytes(2, "little"))
    digest = _sha256(fh, end)
    fh.seek(end)
    fh.write(_TAG + digest.encode("ascii"))


def _sha256(fh: IO[bytes], length: int) -> str:
    """The hex SHA-256 of the first ``length`` bytes of ``fh``, read in chunks."""
    fh.seek(0)
    h = hashlib.sha256()
    buf = memoryview(bytearray(_CHUNK))
    left = length
    while left > 0:
        n = fh.readinto(buf[: min(_CHUNK, left)])
        if not n:
            break
        h.update(buf[:n])
        left -= n
    return h.hexdigest()


# -- reading --------------------------------------------------------------------------------------


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a flowvae checkpoint safely; every failure is a one-line CheckpointError."""
    return _read(Path(path), map_location)[0]


def _read(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], bool]:
    """The checkpoint and whether a digest vouched for it (False: a legacy schema-1 file)."""
    _check_is_file(path)
    # One open file for the digest and the unpickling: a trainer replacing the path in between
    # (os.replace) cannot make us verify one file and load another.
    with open(path, "rb") as fh:
        verified = _verify_digest(fh, path)
        ckpt = _torch_load(fh, path, map_location)
    _check_fields(ckpt, path, verified)
    return ckpt, verified


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist — pass a file like runs/NAME/checkpoints/best.pt"
        )
    if path.is_dir():
        hint = path / "checkpoints" / "best.pt"
        raise CheckpointError(
            f"{path} is a folder — pass a checkpoint file"
            + (f" such as {hint}" if hint.exists() else "")
        )


def _verify_digest(fh: IO[bytes], path: Path) -> bool:
    """True if the file carries a digest and it matches; False if it carries none."""
    size = fh.seek(0, os.SEEK_END)
    if size < _TRAILER_LEN + _EOCD_LEN:
        return False
    fh.seek(size - _TRAILER_LEN)
    trailer = fh.read(_TRAILER_LEN)
    if not trailer.startswith(_TAG):
        return False  # legacy, or a damaged tag: then the schema-2 check below catches it
    stored = trailer[len(_TAG) :].decode("ascii", "replace")
    if _sha256(fh, size - _TRAILER_LEN) != stored:
        raise CheckpointError(
            f"{path} is corrupted (its contents do not match the digest stored in it) — {_FIX}"
        )
    return True


def _torch_load(fh: IO[bytes], path: Path, map_location: str | torch.device) -> Any:
    fh.seek(0)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" for a stray file
            warnings.simplefilter("ignore")
            return torch.load(fh, map_location=map_location, weights_only=True)
    except Exception as exc:  # garbage makes the unpickler raise IndexError, KeyError, ...
        reason = _reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain-tensor checkpoint ({reason}); "
                "flowvae loads checkpoints with weights_only=True"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable flowvae checkpoint: {_what_is_wrong(fh)}"
        ) from None


def _check_fields(ckpt: Any, path: Path, verified: bool) -> None:
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED):
        raise CheckpointError(
            f"{path} is a torch file but not a flowvae checkpoint (missing model/config/step)"
        )
    schema = ckpt.get("schema")
    if schema == SCHEMA and not verified:
        raise CheckpointError(f"{path} is corrupted (its digest is missing or damaged) — {_FIX}")
    if schema != SCHEMA and schema not in LEGACY_SCHEMAS:
        raise CheckpointError(
            f"{path} has checkpoint schema {schema!r} (flowvae {ckpt.get('version', '?')}); "
            f"this flowvae {__version__} reads schema 1 and {SCHEMA} — use the flowvae version "
            "that wrote it"
        )


def _what_is_wrong(fh: IO[bytes]) -> str:
    """What the file is instead of a checkpoint, in the user's terms: torch.load's own errors
    ("Unsupported operand 80", "pop from empty list") name its internals, not the file."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return "the file is empty (0 bytes) — use another checkpoint or copy it again"
    fh.seek(0)
    head = fh.read(4)
    fh.seek(0)
    try:
        with zipfile.ZipFile(fh) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        if head == b"PK\x03\x04":
            return (
                "the archive is truncated (its end is missing: a write or copy was cut short) — "
                "use another checkpoint or copy it again"
            )
        return (
            "it is not a zip archive, as torch.save writes (another kind of file?) — pass a "
            "checkpoint such as runs/NAME/checkpoints/best.pt"
        )
    if not any(name.endswith("/data.pkl") for name in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return (
            f"it is a zip archive but not a torch checkpoint (it holds {shown or 'nothing'}) — "
            "pass a checkpoint such as runs/NAME/checkpoints/best.pt"
        )
    if damaged is not None:
        return f"the archive's entry {damaged} is damaged — use another checkpoint or copy it again"
    return "torch cannot read the archive (damaged?) — use another checkpoint or copy it again"


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load error (not the weights_only boilerplate around it)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    first = (useful or lines or [type(exc).__name__])[0]
    return first.split(". ", 1)[0].removesuffix(".")[:160]  # first sentence


# -- resuming -------------------------------------------------------------------------------------


class Found(NamedTuple):
    """The checkpoint to resume from, and the newer-or-other files that failed to load."""

    path: Path
    ckpt: dict[str, Any]
    rejected: list[tuple[Path, str]]  # (file, its one-line CheckpointError message)


def newest_intact(
    ckpt_dir: str | Path, names: tuple[str, ...] = ("last.pt", "best.pt")
) -> Found | None:
    """The checkpoint with the highest stored step among ``names`` that loads and verifies.

    For ``--resume``: a corrupt last.pt falls back to best.pt instead of ending the run, and
    ``rejected`` says which file was skipped and why. Ties go to the earlier name (last.pt).
    None when no file loads (``rejected`` is then lost: call ``check`` to explain each file).
    Loads every candidate, so resuming reads both files once.
    """
    folder = Path(ckpt_dir)
    best: tuple[Path, dict[str, Any]] | None = None
    rejected: list[tuple[Path, str]] = []
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            ckpt = load(path)
        except CheckpointError as exc:
            rejected.append((path, str(exc)))
            continue
        if best is None or int(ckpt["step"]) > int(best[1]["step"]):
            best = (path, ckpt)
    return None if best is None else Found(best[0], best[1], rejected)


# -- verifying ------------------------------------------------------------------------------------

STATUSES = ("ok", "legacy", "corrupt", "missing", "stale", "busy")


@dataclass(frozen=True)
class Row:
    """One line of ``flowvae verify``.

    status: ok (verified or parses), legacy (schema-1 checkpoint: loads, cannot be verified),
    corrupt, missing, stale (a temporary file left by a killed writer), busy (a live flowvae
    process holds the folder's write lock: files may change while you look).
    """

    file: Path
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "legacy")


def check(path: str | Path) -> Row:
    """The state of one checkpoint file."""
    path = Path(path)
    if not path.exists():
        return Row(path, "missing", "no such file")
    try:
        ckpt, verified = _read(path)
    except CheckpointError as exc:
        # the row names the file already; keep the message's reason and fix
        return Row(path, "corrupt", str(exc).replace(str(path), path.name))
    step = ckpt["step"]
    if verified:
        return Row(path, "ok", f"step {step}, digest verified")
    return Row(path, "legacy", f"step {step}, schema {ckpt['schema']}: written without a digest")
