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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .catalog import DATASETS, DatasetEntry, data_root
from .images import ImageData, build, check_binarize, check_valid_size
from .pixels import DEFAULT_EPS

__all__ = ["FILE", "LAYOUT", "load_npz", "read_npz"]

FILE = "data.npz"
SPLITS = ("train", "valid", "test")
LAYOUT = (
    "arrays train and test (and optionally valid), each (N, H, W) or (N, H, W, C), uint8 0..255 "
    "or floats in [0, 1]"
)
VALID_FRACTION = 10


def _locate(root: str | os.PathLike[str] | None) -> Path:
    path = data_root("npz") if root is None else Path(root).expanduser()
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise DataError(
            f"no .npz file at {path} — set data.root to your .npz file (layout: {LAYOUT})"
        )
    return path


def _open(path: Path) -> dict[str, np.ndarray]:
    """Every array of the file, read eagerly (so a damaged member fails here)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an archive of named arrays")
        with archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"{path} is not a readable .npz file (corrupted, truncated or holding pickled "
            f"objects: {reason}) — write it with np.savez(path, train=..., test=...)"
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


def load_npz(
    root: str | os.PathLike[str] | None = None,
    valid_size: int | None = None,
    binarize: str = "dynamic",
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    pixels: str = "binary",
    eps: float = DEFAULT_EPS,
) -> ImageData:
    """Images from your .npz file (``root``: the file, or a folder holding ``data.npz``); see the
    module docstring for the layout and the split."""
    del download, mirrors, progress  # the file is yours: nothing to fetch
    check_binarize(binarize)
    path = _locate(root)
    rows, image_shape = read_npz(path)
    train = rows["train"]
    if "valid" in rows:
        if valid_size is not None:
            raise DataError(
                f"{path} has a valid array, so data.valid_size must be null (got {valid_size})"
            )
        valid = rows["valid"]
    else:
        n = train.shape[0]
        held = check_valid_size(n // VALID_FRACTION if valid_size is None else valid_size, n)
        train, valid = train[: n - held], train[n - held :]
    return build(
        train,
        valid,
        rows["test"],
        image_shape=image_shape,
        binarize=binarize,
        pixels=pixels,
        eps=eps,
        seed=seed,
        device=device,
    )


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
