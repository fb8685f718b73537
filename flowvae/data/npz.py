"""Your own images: a ``.npz`` file of arrays, so any image set can be fitted.

Layout (``np.savez(path, train=..., test=..., valid=...)``):

- ``train`` and ``test`` (required), ``valid`` (optional): images, one per entry along the
  first axis, each (N, H, W) for one channel or (N, H, W, C) channels-last; all with the same
  image shape and the same kind of values:
- uint8 intensities 0..255 (binarised as Bernoulli(k/255), or dequantised as
  x = ε + (1 − 2ε)(k + u)/256 for a continuous likelihood), or bool / floats in [0, 1]
  (binarised as Bernoulli(v), or squeezed as x = ε + (1 − 2ε)·v; floats are not dequantised).
- Other arrays (labels, ...) are ignored. Object arrays are refused (no pickles are loaded).

Split: ``valid`` if the file has it (then data.valid_size must stay null), else the last
``valid_size`` training images (default: a tenth). ``data.root`` is the .npz file itself, or a
folder holding ``data.npz``. Nothing is downloaded.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .catalog import DATASETS, DatasetEntry
from .loader import Fetch, RawSplits, load_dataset

__all__ = ["FILE", "LAYOUT", "load_npz", "read_npz", "read_user_npz"]

FILE = "data.npz"
SPLITS = ("train", "valid", "test")
LAYOUT = (
    "arrays train and test (and optionally valid), each (N, H, W) or (N, H, W, C), uint8 0..255 "
    "or floats in [0, 1]"
)
VALID_FRACTION = 10


def _locate(path: Path) -> Path:
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise DataError(
            f"no .npz file at {path} — set data.root to your .npz file (layout: {LAYOUT})"
        )
    return path


#: A .npz is a zip archive: its first bytes are a zip header (an empty archive: its end record).
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_WRITE = "write it with np.savez(path, train=..., test=...)"


def _kind(path: Path) -> str:
    """Whether the file starts like a .npz (a zip), a single .npy array, or something else."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({' '.join(str(e).split())})") from None
    if head.startswith(_ZIP_MAGICS):
        return "npz"
    return "npy" if head.startswith(_NPY_MAGIC) else "other"


def _open(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file, read eagerly (so a damaged member fails here)."""
    kind = _kind(path)
    if kind == "other":
        raise DataError(f"{path} is not an .npz archive (no zip header) — {_WRITE}")
    if kind == "npy":
        raise DataError(
            f"{path} is a single .npy array, not an .npz archive of named arrays — {_WRITE}"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        problem = (
            "holds pickled objects" if "allow_pickle" in reason else "is corrupted or truncated"
        )
        raise DataError(
            f"{path} is not a readable .npz file ({problem}: {reason}) — {_WRITE}"
        ) from None


def _check(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    """One split as (N, C, H, W): uint8, or float32 in [0, 1]."""
    where = f"{path}: '{name}'"
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        raise DataError(
            f"{where} has shape {array.shape}; expected (N, H, W) or (N, H, W, C) with N ≥ 1"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where} has dtype {array.dtype}; use uint8 (0..255) or floats in [0, 1]")
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise DataError(f"{where} holds floats outside [0, 1]; scale them into [0, 1]")
    images = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def read_npz(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], tuple[int, ...]]:
    """({split: rows (N, C·H·W)}, image shape) of a .npz file in the documented layout; image
    shape (H, W) for one channel, (C, H, W) otherwise. Any problem is one DataError line."""
    path = Path(path)
    arrays = _open(path)
    missing = [name for name in ("train", "test") if name not in arrays]
    if missing:
        held = ", ".join(arrays) or "no arrays"
        raise DataError(f"{path} has no {' or '.join(missing)} array (it holds {held}); {LAYOUT}")
    splits = {name: _check(path, name, arrays[name]) for name in SPLITS if name in arrays}
    shapes = {name: a.shape[1:] for name, a in splits.items()}
    kinds = {name: a.dtype for name, a in splits.items()}
    if len(set(shapes.values())) > 1 or len(set(kinds.values())) > 1:
        described = ", ".join(f"{n} {shapes[n]} {kinds[n]}" for n in splits)
        raise DataError(f"{path}: the arrays differ in image shape or dtype ({described})")
    c, h, w = shapes["train"]
    image_shape = (h, w) if c == 1 else (c, h, w)
    rows = {name: torch.from_numpy(a.reshape(a.shape[0], -1)) for name, a in splits.items()}
    return rows, image_shape


def read_user_npz(fetch: Fetch) -> RawSplits:
    """Your .npz file (``root``: the file, or a folder holding ``data.npz``); nothing to fetch."""
    path = _locate(fetch.folder("npz"))
    rows, image_shape = read_npz(path)
    train = rows["train"]
    return RawSplits(
        train=train,
        test=rows["test"],
        image_shape=image_shape,
        default_valid=train.shape[0] // VALID_FRACTION,
        valid=rows.get("valid"),
        where=str(path),
    )


#: Images from your .npz file (``root``: the file, or a folder holding ``data.npz``); see the
#: module docstring for the layout and the split.
load_npz = partial(load_dataset, read_user_npz)


DATASETS.register("npz")(
    DatasetEntry(
        load=load_npz,
        likelihood="bernoulli",
        title="images from a .npz file",
        source="your file: data.root (a .npz, or a folder holding data.npz)",
        files=LAYOUT,
        split="valid array if present, else the last valid_size training images (default a tenth)",
        preprocessing="uint8: Bernoulli(k/255) or dequantised; floats in [0, 1]: Bernoulli or squeezed",
    )
)
