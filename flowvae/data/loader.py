"""The one path from a dataset's files to :class:`ImageData`.

A dataset module only reads: its ``read(fetch)`` finds (or downloads) its files and returns the
raw splits as intensities (:class:`RawSplits`). :func:`load_dataset` does the rest for every
dataset alike: the checks of the keywords, the validation split (the last ``valid_size``
training images, unless the files have their own) and :func:`flowvae.data.images.build`
(binarisation or dequantisation, fixed-seed validation and test pixels). A loader is
``functools.partial(load_dataset, read)``; every loader takes the same keywords (root,
valid_size, binarize, seed, device, download, mirrors, progress, pixels, eps).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError
from .catalog import data_root
from .images import ImageData, build, check_binarize, check_valid_size
from .pixels import DEFAULT_EPS

__all__ = ["Fetch", "RawSplits", "load_dataset", "note"]


@dataclass(frozen=True)
class Fetch:
    """Where a dataset's files are and whether missing ones may be fetched."""

    root: str | os.PathLike[str] | None = None
    download: bool = True
    mirrors: Sequence[str] | None = None
    progress: bool = True

    def folder(self, default: str) -> Path:
        """``root``, else the dataset's default folder ``default`` under FLOWVAE_DATA."""
        return data_root(default) if self.root is None else Path(self.root).expanduser()


@dataclass(frozen=True)
class RawSplits:
    """A dataset's intensities as its files hold them, one image per row (CPU; uint8 0..255 or
    float32 in [0, 1]). ``train`` still holds the images that will validate, unless the files
    bring their own ``valid`` split. ``patch``: every row becomes one random square patch."""

    train: Tensor
    test: Tensor
    image_shape: tuple[int, ...]
    #: validation images held out of ``train`` when data.valid_size is null
    default_valid: int
    valid: Tensor | None = None
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    patch: int | None = None
    where: str = ""  # the file, named in errors about the split


def _split(raw: RawSplits, valid_size: int | None) -> tuple[Tensor, ...]:
    """(train, valid, train labels, valid labels): the last ``valid_size`` training images
    validate, unless the files have a validation split of their own."""
    if raw.valid is not None:
        if valid_size is not None:
            raise DataError(
                f"{raw.where} has a valid array, so data.valid_size must be null (got {valid_size})"
            )
        return raw.train, raw.valid, raw.train_labels, raw.valid_labels
    n = raw.train.shape[0]
    held = check_valid_size(raw.default_valid if valid_size is None else valid_size, n)
    labels = raw.train_labels
    return (
        raw.train[: n - held],
        raw.train[n - held :],
        None if labels is None else labels[: n - held],
        None if labels is None else labels[n - held :],
    )


def load_dataset(
    read: Callable[[Fetch], RawSplits],
    root: str | os.PathLike[str] | None = None,
    *,
    n_train: int | None = None,
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
    """The dataset ``read`` returns, split and built into :class:`ImageData` on ``device``.

    ``n_train``: the training images the files are known to hold, so a bad ``valid_size`` fails
    before any file is touched. Validation and test pixels are drawn once with fixed seeds;
    ``seed`` only sets the one-off draw of the training set when ``binarize="static"``;
    ``pixels``: "binary" (Bernoulli draws) or "continuous" (dequantised into (eps, 1 - eps)).
    """
    check_binarize(binarize)
    if n_train is not None and valid_size is not None:
        check_valid_size(valid_size, n_train)
    raw = read(Fetch(root, download, mirrors, progress))
    train, valid, train_labels, valid_labels = _split(raw, valid_size)
    return build(
        train,
        valid,
        raw.test,
        image_shape=raw.image_shape,
        binarize=binarize,
        pixels=pixels,
        eps=eps,
        seed=seed,
        device=device,
        patch=raw.patch,
        labels=(train_labels, valid_labels, raw.test_labels),
    )


def note(message: str) -> None:
    """One information line on stderr (what a loader could not verify, say)."""
    print(f"note: {message}", file=sys.stderr)
