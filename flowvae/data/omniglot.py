"""Omniglot at 28×28, the split of the IWAE and Sylvester-flow papers (Burda et al. 2016).

Source: ``chardata.mat`` from the IWAE repository (yburda/iwae, datasets/OMNIGLOT), checked
against the MD5 below (the only digest published for it, by tfsnippet's loader). A MATLAB v5
file read with scipy.io.loadmat: ``data`` (784 × 24,345) and ``testdata`` (784 × 8,070), grey
levels in [0, 1], one image per column in MATLAB's column-major order.

Split: the 24,345 training images shuffled as IWAE does (numpy RandomState(123).permutation);
the last ``valid_size`` (default 1,345) of them validate; the 8,070 test images test.

Preprocessing: binarised like MNIST, each pixel a Bernoulli draw with its grey level as the
probability, dynamic (fresh every batch) or static; validation and test drawn once with fixed
seeds.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .catalog import DATASETS, DatasetEntry
from .download import ensure_file
from .loader import Fetch, RawSplits, load_dataset

__all__ = ["FILE", "MD5", "MIRRORS", "load_omniglot", "read_chardata", "read_omniglot"]

FILE = "chardata.mat"
MD5 = "21ecaf34373511aa7691cf2e0802aa3d"
MIRRORS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/",
)
SHUFFLE_SEED = 123  # IWAE's datasets.py: RandomState(seed=123).permutation of the training set
VALID_SIZE = 1345
SIDE = 28


def _fix(path: Path) -> str:
    return f"delete {path.name} and run again to re-download it, or replace it with a good copy"


def _loadmat(path: Path) -> dict:
    try:
        import scipy.io
    except ImportError:  # a declared dependency; say so if an environment lacks it
        raise DataError("reading Omniglot's chardata.mat needs scipy — pip install scipy") from None
    try:
        return scipy.io.loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist — {_fix(path)}") from None
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, zlib errors, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"{path} is not a readable MATLAB file (corrupted or truncated: {reason}) — "
            f"{_fix(path)}"
        ) from None


def _images(path: Path, mat: dict, key: str) -> Tensor:
    """One array of ``mat`` as float32 image rows (row-major 28×28), checked."""
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DataError(f"{path} has no '{key}' array (it holds {found}) — {_fix(path)}")
    columns = np.asarray(mat[key])
    if columns.ndim != 2 or columns.shape[0] != SIDE * SIDE or columns.shape[1] == 0:
        raise DataError(
            f"{path}: '{key}' has shape {columns.shape}, expected (784, N): one 28×28 image per "
            f"column — {_fix(path)}"
        )
    if not np.issubdtype(columns.dtype, np.number):
        raise DataError(f"{path}: '{key}' holds {columns.dtype}, not numbers — {_fix(path)}")
    values = columns.astype(np.float32)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise DataError(
            f"{path}: '{key}' holds values outside [0, 1] (grey levels expected) — {_fix(path)}"
        )
    # MATLAB stores each image column-major: image = column.reshape(28, 28, order="F").
    images = values.T.reshape(-1, SIDE, SIDE).transpose(0, 2, 1)
    return torch.from_numpy(np.ascontiguousarray(images).reshape(-1, SIDE * SIDE))


def read_chardata(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """(train, test) float32 rows of 28×28 grey levels in [0, 1] from ``chardata.mat``, in the
    file's order. Any problem is one DataError line."""
    path = Path(path)
    mat = _loadmat(path)
    return _images(path, mat, "data"), _images(path, mat, "testdata")


def read_omniglot(fetch: Fetch) -> RawSplits:
    """Omniglot's ``chardata.mat`` from the folder (downloaded if missing), the training images
    shuffled as IWAE does."""
    path = ensure_file(
        FILE,
        fetch.folder("omniglot"),
        MD5,
        title="Omniglot",
        mirrors=MIRRORS if fetch.mirrors is None else fetch.mirrors,
        algorithm="md5",
        download=fetch.download,
        progress=fetch.progress,
    )
    train, test = read_chardata(path)
    order = torch.from_numpy(np.random.RandomState(SHUFFLE_SEED).permutation(train.shape[0]))
    return RawSplits(train[order], test, (SIDE, SIDE), default_valid=VALID_SIZE)


#: Omniglot from ``root`` (default ``$FLOWVAE_DATA/omniglot`` or ``~/.cache/flowvae/omniglot``),
#: downloading ``chardata.mat`` if it is missing; see the module docstring for the split.
load_omniglot = partial(load_dataset, read_omniglot)

ENTRY = DatasetEntry(
    load=load_omniglot,
    likelihood="bernoulli",
    title="binarised Omniglot (28×28)",
    source="Burda et al. 2016 (IWAE), " + MIRRORS[0] + FILE,
    files=f"{FILE} (MD5 {MD5})",
    split="24,345 train shuffled with RandomState(123), the last valid_size (default 1,345) "
    "validate; 8,070 test",
    preprocessing="28×28 grey levels in [0, 1]; Bernoulli, dynamic or static; valid/test once",
)
DATASETS.register("omniglot")(ENTRY)
