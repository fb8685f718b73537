"""CIFAR-10 as random 3×8×8 patches (D = 192): the paper's third experiment (Table 3).

Source: the CIFAR-10 binary release, ``cifar-10-binary.tar.gz`` (Krizhevsky 2009, 170,052,171
bytes), from https://www.cs.toronto.edu/~kriz/, checked against the SHA256 below and read
straight from the archive (nothing is extracted). Its members
``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin`` hold records of 3,073
bytes: the label (0-9), then 1,024 red, 1,024 green and 1,024 blue bytes, each 32×32 row-major.

Split, by image: the 50,000 training images in batch order, the last ``valid_size`` (default
5,000, a tenth) of them held out to validate; the 10,000 test images test. Patches never cross splits.

Preprocessing: one 8×8 patch per row at a uniformly drawn position (all three channels from the
same place). Validation and test get one patch per image, drawn once with fixed seeds; training
batches draw fresh images, positions and noise every step (``binarize: dynamic``) or use one
patch per training image drawn once from ``seed`` (``static``). Pixels are dequantised and
squeezed, x = ε + (1 − 2ε)·(k + u)/256 with u ~ U[0, 1) (flowvae.data.pixels), for the
logit-normal likelihood; a binary likelihood gets Bernoulli(k/255) pixels instead.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..paper import TABLE3
from .catalog import DATASETS, DatasetEntry, data_root
from .download import ensure_file
from .images import ImageData, build, check_binarize, check_valid_size
from .pixels import DEFAULT_EPS

__all__ = [
    "ARCHIVE",
    "MIRRORS",
    "PATCH",
    "SHA256",
    "load_cifar10_patches",
    "read_archive",
]

ARCHIVE = "cifar-10-binary.tar.gz"
SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
FOLDER = "cifar-10-batches-bin"
TRAIN_MEMBERS = tuple(f"{FOLDER}/data_batch_{i}.bin" for i in range(1, 6))
TEST_MEMBER = f"{FOLDER}/test_batch.bin"
IMAGE_SHAPE = (3, 32, 32)
RECORD = 1 + 3 * 32 * 32  # label byte + pixels
PATCH = 8
#: Without data.valid_size, a tenth of the training images validate (5,000 of 50,000).
VALID_FRACTION = 10


def _fix(path: Path) -> str:
    return f"delete {path.name} and run again to re-download it, or replace it with a good copy"


def _members(path: Path) -> dict[str, bytes]:
    """The batch files' bytes, read in one pass over the gzipped tar stream."""
    wanted = {*TRAIN_MEMBERS, TEST_MEMBER}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name] = tar.extractfile(member).read()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist — {_fix(path)}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"{path} is not a readable tar.gz archive (corrupted or truncated: {reason}) — "
            f"{_fix(path)}"
        ) from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({' '.join(str(e).split())})") from None
    missing = [name for name in (*TRAIN_MEMBERS, TEST_MEMBER) if name not in found]
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)} (not the CIFAR-10 binary release?) — {_fix(path)}"
        )
    return found


def _records(path: Path, name: str, data: bytes) -> tuple[Tensor, Tensor]:
    """(labels int64 (n,), images uint8 (n, 3072)) of one batch file's records."""
    if not data or len(data) % RECORD:
        raise DataError(
            f"{path}: {name} holds {len(data)} bytes, not a whole number of {RECORD}-byte records "
            f"(a label and 3×32×32 pixels; truncated?) — {_fix(path)}"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = torch.from_numpy(rows[:, 0].astype(np.int64))
    if int(labels.max()) > 9:
        raise DataError(
            f"{path}: {name} holds labels up to {int(labels.max())}, expected 0-9 (corrupted?) — "
            f"{_fix(path)}"
        )
    return labels, torch.from_numpy(rows[:, 1:].copy())


def read_archive(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels) of ``cifar-10-binary.tar.gz``;
    images as uint8 rows of 3×32×32 (channel, row, column). Any problem is one DataError line."""
    path = Path(path)
    members = _members(path)
    train = [_records(path, name, members[name]) for name in TRAIN_MEMBERS]
    test_labels, test_images = _records(path, TEST_MEMBER, members[TEST_MEMBER])
    train_labels = torch.cat([labels for labels, _ in train])
    train_images = torch.cat([images for _, images in train])
    return train_images, train_labels, test_images, test_labels


def load_cifar10_patches(
    root: str | os.PathLike[str] | None = None,
    valid_size: int | None = None,
    binarize: str = "dynamic",
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    pixels: str = "continuous",
    eps: float = DEFAULT_EPS,
) -> ImageData:
    """CIFAR-10's random 8×8 patches from ``root`` (default ``$FLOWVAE_DATA/cifar10_patches`` or
    ``~/.cache/flowvae/cifar10_patches``), downloading the archive if it is missing; see the
    module docstring for the split and the preprocessing."""
    check_binarize(binarize)
    root = data_root("cifar10_patches") if root is None else Path(root).expanduser()
    path = ensure_file(
        ARCHIVE,
        root,
        SHA256,
        title="CIFAR-10",
        mirrors=MIRRORS if mirrors is None else mirrors,
        download=download,
        progress=progress,
    )
    images, labels, test_images, test_labels = read_archive(path)
    n = images.shape[0]
    valid_size = check_valid_size(n // VALID_FRACTION if valid_size is None else valid_size, n)
    n_train = n - valid_size
    return build(
        images[:n_train],
        images[n_train:],
        test_images,
        image_shape=IMAGE_SHAPE,
        binarize=binarize,
        pixels=pixels,
        eps=eps,
        seed=seed,
        device=device,
        patch=PATCH,
        labels=(labels[:n_train], labels[n_train:], test_labels),
    )


DATASETS.register("cifar10_patches")(
    DatasetEntry(
        load=load_cifar10_patches,
        likelihood="logit_normal",
        title="CIFAR-10 3×8×8 patches",
        source=f"Krizhevsky 2009, {MIRRORS[0]}{ARCHIVE}",
        files=f"{ARCHIVE} (SHA256 {SHA256[:12]}…)",
        split="train 50,000 − valid_size images, valid the last valid_size (default 5,000), "
        "test 10,000; one patch per valid/test image",
        preprocessing="random 8×8 patches; dequantised, x = ε + (1 − 2ε)(k + u)/256",
        paper=TABLE3,
    )
)
