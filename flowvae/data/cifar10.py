"""CIFAR-10 as random 3×8×8 patches (D = 192): the paper's third experiment (Table 3).

Source: the CIFAR-10 binary release, ``cifar-10-binary.tar.gz`` (Krizhevsky 2009, 170,052,171
bytes), from https://www.cs.toronto.edu/~kriz/, checked against the SHA256 below and read
straight from the archive (nothing is extracted); a folder that holds the archive's extracted
``cifar-10-batches-bin`` (or is it) is read as it is, each batch file checked for its size and
labels (no checksum of the extracted files is published). Its members
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
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..paper import TABLE3
from .catalog import DATASETS, DatasetEntry
from .download import ensure_file
from .loader import Fetch, RawSplits, load_dataset, note

__all__ = [
    "ARCHIVE",
    "MIRRORS",
    "PATCH",
    "SHA256",
    "load_cifar10_patches",
    "read_archive",
    "read_cifar10",
    "read_folder",
]

ARCHIVE = "cifar-10-binary.tar.gz"
SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
FOLDER = "cifar-10-batches-bin"
TRAIN_MEMBERS = tuple(f"{FOLDER}/data_batch_{i}.bin" for i in range(1, 6))
TEST_MEMBER = f"{FOLDER}/test_batch.bin"
IMAGE_SHAPE = (3, 32, 32)
RECORD = 1 + 3 * 32 * 32  # label byte + pixels
BATCH_RECORDS = 10000  # images in each batch file
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


def _splits(path: Path, members: dict[str, bytes]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train = [_records(path, name, members[name]) for name in TRAIN_MEMBERS]
    test_labels, test_images = _records(path, TEST_MEMBER, members[TEST_MEMBER])
    train_labels = torch.cat([labels for labels, _ in train])
    train_images = torch.cat([images for _, images in train])
    return train_images, train_labels, test_images, test_labels


def read_archive(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels) of ``cifar-10-binary.tar.gz``;
    images as uint8 rows of 3×32×32 (channel, row, column). Any problem is one DataError line."""
    path = Path(path)
    return _splits(path, _members(path))


def _batch_file(folder: Path, name: str) -> tuple[str, bytes]:
    path = folder / Path(name).name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({' '.join(str(e).split())})") from None
    if len(data) != BATCH_RECORDS * RECORD:
        raise DataError(
            f"{path} holds {len(data)} bytes, expected {BATCH_RECORDS * RECORD} "
            f"({BATCH_RECORDS:,} records of {RECORD} bytes; truncated?) — replace it with a good "
            f"copy, or delete the folder and put {ARCHIVE} in its place"
        )
    return name, data


def read_folder(folder: str | os.PathLike[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As :func:`read_archive`, from the archive's extracted folder ``cifar-10-batches-bin``
    (the six batch files, each checked for its size and its records' labels)."""
    folder = Path(folder)
    members = dict(_batch_file(folder, name) for name in (*TRAIN_MEMBERS, TEST_MEMBER))
    note(
        f"{folder} is read as extracted: each batch file's size and labels are checked, its "
        f"content is not (the published checksum is of {ARCHIVE})"
    )
    return _splits(folder, members)


def _extracted(root: Path) -> Path | None:
    """The extracted batch folder in ``root`` (or ``root`` itself), if it has all six files."""
    for folder in (root / FOLDER, root):
        if all((folder / Path(name).name).is_file() for name in (*TRAIN_MEMBERS, TEST_MEMBER)):
            return folder
    return None


def read_cifar10(fetch: Fetch) -> RawSplits:
    """CIFAR-10's images from ``cifar-10-binary.tar.gz`` in the folder (downloaded if neither
    it nor its extracted ``cifar-10-batches-bin`` folder is there)."""
    root = fetch.folder("cifar10_patches")
    folder = None if (root / ARCHIVE).is_file() else _extracted(root)
    if folder is not None:
        images, labels, test_images, test_labels = read_folder(folder)
    else:
        path = ensure_file(
            ARCHIVE,
            root,
            SHA256,
            title="CIFAR-10",
            mirrors=MIRRORS if fetch.mirrors is None else fetch.mirrors,
            download=fetch.download,
            progress=fetch.progress,
        )
        images, labels, test_images, test_labels = read_archive(path)
    return RawSplits(
        train=images,
        test=test_images,
        image_shape=IMAGE_SHAPE,
        default_valid=images.shape[0] // VALID_FRACTION,
        train_labels=labels,
        test_labels=test_labels,
        patch=PATCH,
    )


#: CIFAR-10's random 8×8 patches from ``root`` (default ``$FLOWVAE_DATA/cifar10_patches`` or
#: ``~/.cache/flowvae/cifar10_patches``), downloading the archive if neither it nor its
#: extracted folder is there; the keywords of :func:`flowvae.data.loader.load_dataset`.
load_cifar10_patches = partial(load_dataset, read_cifar10, pixels="continuous")


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
