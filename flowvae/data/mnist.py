"""MNIST and the datasets in its IDX format (Fashion-MNIST): found, fetched, checked, split.

Source: the four gzipped IDX files of Y. LeCun's MNIST, from the PyTorch and Google mirrors,
each checked against the SHA256 below. Split: the first 60,000 − valid_size training images
train, the last valid_size (default 10,000) validate, the 10,000 test images test.
Preprocessing: binarised like :mod:`flowvae.data.images` says (dynamic or static Bernoulli
draws; validation and test drawn once with fixed seeds), or dequantised for a continuous
likelihood.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from torch import Tensor

from ..errors import DataError
from ..paper import TABLE2
from .catalog import DATASETS, DatasetEntry, data_root
from .download import MNIST_MIRRORS, DownloadError, fetch, sha256_of
from .idx import read_idx
from .images import BINARIZE_MODES, TEST_SEED, VALID_SEED, ImageData
from .loader import Fetch, RawSplits, load_dataset, note

__all__ = [
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "TEST_IMAGES",
    "TEST_LABELS",
    "BINARIZE_MODES",
    "FILES",
    "SHA256",
    "TEST_SEED",
    "VALID_SEED",
    "MNIST",
    "IdxSource",
    "default_root",
    "ensure_files",
    "load_idx_dataset",
    "load_mnist",
    "read_idx_splits",
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

#: SHA256 of the same files un-gzipped (of the gzipped files above), so that un-gzipped copies
#: are checked as well.
RAW_SHA256: dict[str, str] = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

SHAPES: dict[str, tuple[int, ...]] = {
    TRAIN_IMAGES: (60000, 28, 28),
    TRAIN_LABELS: (60000,),
    TEST_IMAGES: (10000, 28, 28),
    TEST_LABELS: (10000,),
}

N_TRAIN_FILE = 60000
PIXELS = 784
IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True)
class IdxSource:
    """A dataset of MNIST's four IDX files (60,000 train and 10,000 test images of 28×28 bytes,
    labels 0-9): what it is called, where its files come from and their SHA256."""

    title: str
    folder: str  # default folder under $FLOWVAE_DATA or ~/.cache/flowvae
    sha256: dict[str, str] = field(repr=False)
    mirrors: tuple[str, ...]
    #: SHA256 of the un-gzipped files, where known; without it they are checked by header
    #: and size only
    raw_sha256: dict[str, str] | None = field(default=None, repr=False)


MNIST = IdxSource("MNIST", "mnist", SHA256, MNIST_MIRRORS, RAW_SHA256)


def default_root() -> Path:
    """Where MNIST lives by default: ``$FLOWVAE_DATA/mnist``, or ``$FLOWVAE_DATA`` itself when the
    MNIST files are there (the rule before other datasets), else ``~/.cache/flowvae/mnist``."""
    env = os.environ.get("FLOWVAE_DATA")
    if env and any((Path(env).expanduser() / name).is_file() for name in FILES):
        return Path(env).expanduser()
    return data_root(MNIST.folder)


def _fix(path: Path, source: IdxSource) -> str:
    return (
        f"delete {path.name} and run again to re-download it, "
        f"or replace it with a good copy of the {source.title} file"
    )


def _check_digest(path: Path, expected: str, source: IdxSource) -> None:
    digest = sha256_of(path)
    if digest != expected:
        raise DataError(
            f"{path} has a checksum mismatch (SHA256 {digest}, expected {expected}) — delete "
            f"it to re-download, or replace it with a good copy of the {source.title} file"
        )


def _find(root: Path, source: IdxSource) -> tuple[dict[str, Path], list[str]]:
    """Present files (gz checksummed, un-gzipped ones too where their sums are known) and the
    names of the missing ones."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    unchecked: list[str] = []
    for name in FILES:
        gz, raw = root / name, root / name[: -len(".gz")]
        if gz.is_file():
            _check_digest(gz, source.sha256[name], source)
            found[name] = gz
        elif raw.is_file():
            if source.raw_sha256 is not None:
                _check_digest(raw, source.raw_sha256[name], source)
            else:
                unchecked.append(raw.name)
            found[name] = raw
        else:
            missing.append(name)
    if unchecked and not missing:
        note(
            f"{', '.join(unchecked)} in {root} are read as they are: their IDX headers and sizes "
            f"are checked, their content is not (the {source.title} checksums are of the .gz files)"
        )
    return found, missing


def ensure_files(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    source: IdxSource = MNIST,
) -> dict[str, Path]:
    """Return ``{gz filename: path}`` for the four IDX files in ``root``, fetching missing ones.

    Each file may be gzipped (``name.gz``, checked against its SHA256) or un-gzipped (``name``
    without ``.gz``, checked against the SHA256 of its content where the source knows it, and
    by magic number and size when read). Missing files are downloaded (from ``mirrors``,
    default the source's) when ``download`` is true; otherwise, or when the download fails, a
    one-line :class:`DataError` names the missing files and the folder.
    """
    if root is None:
        root = default_root() if source is MNIST else data_root(source.folder)
    root = Path(root).expanduser()
    mirrors = source.mirrors if mirrors is None else mirrors
    found, missing = _find(root, source)
    hint = "or set FLOWVAE_DATA to a folder that has them"
    if missing and not download:
        raise DataError(
            f"{source.title} is not in {root} and downloading is off: put "
            f"{', '.join(missing)} there, {hint}, or allow downloading"
        )
    for i, name in enumerate(missing):
        try:
            found[name] = fetch(name, root, source.sha256[name], mirrors=mirrors, progress=progress)
        except DownloadError as e:
            if e.checksum_failed:
                raise
            left = missing[i:]
            last = e.reasons[-1] if e.reasons else "no mirrors given"
            raise DataError(
                f"{source.title} is not in {root} and could not be downloaded (no network? "
                f"{last}): put {', '.join(left)} there, {hint}"
            ) from None
    return found


def _read(path: Path, name: str, source: IdxSource) -> Tensor:
    data = read_idx(path, fix=_fix(path, source))
    if tuple(data.shape) != SHAPES[name]:
        raise DataError(
            f"{path} has shape {tuple(data.shape)}, expected {SHAPES[name]} for {name} — "
            f"{_fix(path, source)}"
        )
    if name in (TRAIN_LABELS, TEST_LABELS) and data.numel() and int(data.max()) > 9:
        raise DataError(
            f"{path} holds labels up to {int(data.max())}, expected 0-9 — {_fix(path, source)}"
        )
    return data


def read_idx_splits(source: IdxSource, fetch: Fetch) -> RawSplits:
    """The four IDX files of ``source`` (fetched if missing) as raw splits: 60,000 training
    images, the last 10,000 validating unless data.valid_size says otherwise, 10,000 test."""
    paths = ensure_files(fetch.root, fetch.download, fetch.mirrors, fetch.progress, source)
    return RawSplits(
        train=_read(paths[TRAIN_IMAGES], TRAIN_IMAGES, source).reshape(N_TRAIN_FILE, PIXELS),
        test=_read(paths[TEST_IMAGES], TEST_IMAGES, source).reshape(-1, PIXELS),
        image_shape=IMAGE_SHAPE,
        default_valid=10000,
        train_labels=_read(paths[TRAIN_LABELS], TRAIN_LABELS, source).long(),
        test_labels=_read(paths[TEST_LABELS], TEST_LABELS, source).long(),
    )


def load_idx_dataset(
    source: IdxSource, root: str | os.PathLike[str] | None = None, **keywords
) -> ImageData:
    """An IDX dataset (``source``: its name, files, checksums and mirrors) from ``root``,
    downloading missing files; the keywords of :func:`flowvae.data.loader.load_dataset`."""
    read = partial(read_idx_splits, source)
    return load_dataset(read, root, n_train=N_TRAIN_FILE, **keywords)


#: MNIST from ``root`` (default :func:`default_root`), downloading missing files; the keywords
#: of :func:`flowvae.data.loader.load_dataset`.
load_mnist = partial(load_idx_dataset, MNIST)


def idx_entry(
    source: IdxSource, load: Callable[..., ImageData], title: str, cited: str, paper=None
) -> DatasetEntry:
    """The registry entry of an IDX dataset (MNIST's files, split and preprocessing)."""
    return DatasetEntry(
        load=load,
        likelihood="bernoulli",
        title=title,
        source=f"{cited}, from " + ", ".join(source.mirrors),
        files=", ".join(f"{name} (SHA256 {source.sha256[name][:12]}…)" for name in FILES),
        split="train 60,000 − valid_size, valid the last valid_size (default 10,000), test 10,000",
        preprocessing="28×28 grey; Bernoulli(intensity/255), dynamic or static; valid/test once",
        paper=paper,
    )


DATASETS.register("mnist")(
    idx_entry(MNIST, load_mnist, "binarised MNIST", "LeCun et al. 1998", TABLE2)
)
