"""A small reader for the IDX format of the MNIST files (gzipped or not).

Every problem with a file (missing, unreadable, not IDX, truncated, corrupted gzip)
raises :class:`~flowvae.errors.DataError` with a one-line message that names the
file and says how to fix it.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import torch

from ..errors import DataError
from .download import one_line

__all__ = ["read_idx", "IDX_UBYTE", "IMAGES_MAGIC", "LABELS_MAGIC"]

IDX_UBYTE = 0x08  # the only IDX element type MNIST uses (unsigned byte)
IMAGES_MAGIC = 0x00000803  # ubyte, 3 dims (N, rows, cols)
LABELS_MAGIC = 0x00000801  # ubyte, 1 dim (N,)
_MAGICS = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}

DEFAULT_FIX = "delete it and run again to re-download, or replace it from a good copy"
_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: Path) -> bool:
    if path.name.endswith(".gz"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(2) == _GZIP_MAGIC
    except OSError:
        return False  # the real read below reports the problem


def read_idx(path: str | os.PathLike[str], fix: str = DEFAULT_FIX) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (images or labels) into a uint8 tensor.

    ``path`` may be gzipped (``.gz`` name or gzip magic bytes) or raw. The magic
    number must be 0x00000803 (images, 3 dims) or 0x00000801 (labels, 1 dim) and
    the data must hold exactly as many bytes as the header's dimensions declare.
    ``fix`` is the advice appended to every error message.
    """
    path = Path(path)
    data = _read_bytes(path, fix)
    dims, header = _header(path, data, fix)
    expected = math.prod(dims)
    found = len(data) - header
    if found < expected:
        raise DataError(
            f"{path} is truncated (expected {expected} bytes of data after the {header}-byte "
            f"header, found {found}) — {fix}"
        )
    if found > expected:
        raise DataError(
            f"{path} is corrupted ({found - expected} bytes more than the {expected} bytes of "
            f"data its header declares) — {fix}"
        )
    if expected == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    buffer = bytearray(data)  # writable, so torch.frombuffer does not warn
    del data
    return torch.frombuffer(buffer, dtype=torch.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path, fix: str) -> bytes:
    """The file's bytes, gunzipped when it is gzipped; every failure as one DataError line."""
    try:
        if _is_gzip(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist — {fix}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an IDX file — {fix}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is not a valid gzip file (corrupted or truncated: {one_line(e)}) — {fix}"
        ) from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({one_line(e)}) — check its permissions") from None


def _header(path: Path, data: bytes, fix: str) -> tuple[tuple[int, ...], int]:
    """The dimensions an IDX header declares, and the header's length in bytes."""
    if len(data) < 4:
        raise DataError(
            f"{path} is truncated (only {len(data)} bytes, too short for an IDX header) — {fix}"
        )
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    magic = (dtype << 8) | ndim
    if zero != 0 or dtype != IDX_UBYTE or magic not in _MAGICS:
        raise DataError(
            f"{path} is not an MNIST IDX file (magic number 0x{int.from_bytes(data[:4], 'big'):08x}, "
            f"expected 0x{IMAGES_MAGIC:08x} for images or 0x{LABELS_MAGIC:08x} for labels) — {fix}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path} is truncated (only {len(data)} bytes, the IDX header needs {header}) — {fix}"
        )
    return struct.unpack(f">{ndim}I", data[4:header]), header
