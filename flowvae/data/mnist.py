"""Binarised MNIST (60k train file split into train/valid, 10k test), found, fetched and checked."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError
from .download import MNIST_MIRRORS, DownloadError, fetch, sha256_of
from .idx import read_idx

__all__ = [
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "TEST_IMAGES",
    "TEST_LABELS",
    "FILES",
    "SHA256",
    "BinaryMNIST",
    "default_root",
    "ensure_files",
    "load_mnist",
]

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: SHA256 of the gzipped files, as served by the mirrors.
SHA256: dict[str, str] = {
    TRAIN_IMAGES: "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    TRAIN_LABELS: "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    TEST_IMAGES: "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    TEST_LABELS: "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}

SHAPES: dict[str, tuple[int, ...]] = {
    TRAIN_IMAGES: (60000, 28, 28),
    TRAIN_LABELS: (60000,),
    TEST_IMAGES: (10000, 28, 28),
    TEST_LABELS: (10000,),
}

N_TRAIN_FILE = 60000
PIXELS = 784
BINARIZE_MODES = ("dynamic", "static")
VALID_SEED = 1234  # the validation and test sets are binarised once, independent of `seed`
TEST_SEED = 4321


def default_root() -> Path:
    """``$FLOWVAE_DATA`` if set, else ``~/.cache/flowvae/mnist``."""
    env = os.environ.get("FLOWVAE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flowvae" / "mnist"


def _fix(path: Path) -> str:
    return (
        f"delete {path.name} and run again to re-download it, "
        "or replace it with a good copy of the MNIST file"
    )


def _find(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Present files (gz checksummed, raw as they are) and the names of the missing ones."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in FILES:
        gz, raw = root / name, root / name[: -len(".gz")]
        if gz.is_file():
            digest = sha256_of(gz)
            if digest != SHA256[name]:
                raise DataError(
                    f"{gz} has a checksum mismatch (SHA256 {digest}, expected {SHA256[name]}) — "
                    "delete it to re-download, or replace it with a good copy"
                )
            found[name] = gz
        elif raw.is_file():
            found[name] = raw  # cannot be checksummed against the .gz sums; read_idx checks it
        else:
            missing.append(name)
    return found, missing


def ensure_files(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    progress: bool = True,
) -> dict[str, Path]:
    """Return ``{gz filename: path}`` for the four MNIST files in ``root``, fetching missing ones.

    Each file may be gzipped (``name.gz``, checked against its SHA256) or
    un-gzipped (``name`` without ``.gz``, checked by magic number and size when read).
    Missing files are downloaded when ``download`` is true; otherwise, or when the
    download fails, a one-line :class:`DataError` names the missing files and the folder.
    """
    root = default_root() if root is None else Path(root).expanduser()
    found, missing = _find(root)
    hint = "or set FLOWVAE_DATA to a folder that has them"
    if missing and not download:
        raise DataError(
            f"MNIST is not in {root} and downloading is off: put {', '.join(missing)} there, "
            f"{hint}, or allow downloading"
        )
    for i, name in enumerate(missing):
        try:
            found[name] = fetch(name, root, SHA256[name], mirrors=mirrors, progress=progress)
        except DownloadError as e:
            if e.checksum_failed:
                raise
            left = missing[i:]
            last = e.reasons[-1] if e.reasons else "no mirrors given"
            raise DataError(
                f"MNIST is not in {root} and could not be downloaded (no network? {last}): "
                f"put {', '.join(left)} there, {hint}"
            ) from None
    return found


def _read(path: Path, name: str) -> Tensor:
    data = read_idx(path, fix=_fix(path))
    if tuple(data.shape) != SHAPES[name]:
        raise DataError(
            f"{path} has shape {tuple(data.shape)}, expected {SHAPES[name]} for {name} — "
            f"{_fix(path)}"
        )
    if name in (TRAIN_LABELS, TEST_LABELS) and data.numel() and int(data.max()) > 9:
        raise DataError(
            f"{path} holds labels up to {int(data.max())}, expected digits 0-9 — {_fix(path)}"
        )
    return data


def _binarize_once(images: Tensor, seed: int) -> Tensor:
    """Bernoulli-sample uint8 intensities with a local generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.float().div_(255.0), generator=gen)


@dataclass(repr=False)
class BinaryMNIST:
    """Binarised MNIST on one device.

    ``train`` holds uint8 intensities 0..255 (``binarize="dynamic"``: every
    :meth:`train_batch` samples fresh binary pixels) or uint8 {0, 1}
    (``binarize="static"``: binarised once at load time). ``valid`` and ``test`` are
    float32 {0, 1}, binarised once with fixed seeds. Labels are int64 digits.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    binarize: str
    train_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    test_labels: Tensor | None = None
    #: (height, width) of one image; rows of train/valid/test are its pixels flattened.
    image_shape: tuple[int, int] = (28, 28)

    @property
    def device(self) -> torch.device:
        return self.train.device

    def train_batch(self, batch_size: int) -> Tensor:
        """A (batch_size, 784) float32 {0, 1} batch drawn with replacement.

        Uses the global torch RNG of the data's device (indices and, if dynamic,
        the Bernoulli pixels), so restoring a checkpointed RNG state resumes exactly.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n = self.train.shape[0]
        if n == 0:
            raise DataError("the training set is empty — use a smaller valid_size")
        idx = torch.randint(0, n, (batch_size,), device=self.train.device)
        x = self.train[idx].float()
        if self.binarize == "dynamic":
            return torch.bernoulli(x.div_(255.0))
        return x

    def __repr__(self) -> str:
        return (
            f"BinaryMNIST(train={tuple(self.train.shape)}, valid={tuple(self.valid.shape)}, "
            f"test={tuple(self.test.shape)}, binarize={self.binarize!r}, device={self.device})"
        )


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    valid_size: int = 10000,
    binarize: str = "dynamic",
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = True,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    progress: bool = True,
) -> BinaryMNIST:
    """Load binarised MNIST from ``root`` (default :func:`default_root`), downloading if needed.

    The validation set is the last ``valid_size`` images of the 60k training file,
    the training set the first ``60000 - valid_size``. Validation and test pixels are
    binarised once with fixed seeds (1234 and 4321), independent of
    ``seed``; ``seed`` only sets the one-off binarisation of the training set when
    ``binarize="static"``.
    """
    if binarize not in BINARIZE_MODES:
        raise DataError(f"binarize must be 'dynamic' or 'static', got {binarize!r}")
    if isinstance(valid_size, bool) or not isinstance(valid_size, int):
        raise DataError(f"valid_size must be an integer, got {valid_size!r}")
    if not 0 <= valid_size < N_TRAIN_FILE:
        raise DataError(
            f"valid_size must be between 0 and {N_TRAIN_FILE - 1} (the last valid_size of the "
            f"{N_TRAIN_FILE} training images are held out), got {valid_size}"
        )
    device = torch.device(device)

    paths = ensure_files(root, download=download, mirrors=mirrors, progress=progress)
    images = _read(paths[TRAIN_IMAGES], TRAIN_IMAGES).reshape(N_TRAIN_FILE, PIXELS)
    labels = _read(paths[TRAIN_LABELS], TRAIN_LABELS).long()
    test_images = _read(paths[TEST_IMAGES], TEST_IMAGES).reshape(-1, PIXELS)
    test_labels = _read(paths[TEST_LABELS], TEST_LABELS).long()

    n_train = N_TRAIN_FILE - valid_size
    train, valid = images[:n_train], images[n_train:]
    if binarize == "static":
        train = _binarize_once(train, seed).to(torch.uint8)
    else:
        train = train.clone()  # do not keep the whole 60k file alive through a view
    return BinaryMNIST(
        train=train.to(device),
        valid=_binarize_once(valid, VALID_SEED).to(device),
        test=_binarize_once(test_images, TEST_SEED).to(device),
        binarize=binarize,
        train_labels=labels[:n_train].to(device),
        valid_labels=labels[n_train:].to(device),
        test_labels=test_labels.to(device),
    )
