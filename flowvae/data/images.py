"""Images on one device as pixel rows, the splits every dataset ends in, and how batches are drawn.

A loader reads its files into intensities (one image per row: uint8 0..255 or float32 in
[0, 1]) and hands the three splits to :func:`build`, which draws the validation and test pixels
once with fixed seeds and keeps what training batches need. Optionally every row is cut to a
random square patch (CIFAR-10's 8×8 patches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowvae.data.pixels import DEFAULT_EPS, Pixels, make_pixels
from flowvae.errors import DataError

__all__ = [
    "BINARIZE_MODES",
    "TEST_SEED",
    "VALID_SEED",
    "Crop",
    "ImageData",
    "build",
    "check_binarize",
    "check_valid_size",
]

BINARIZE_MODES = ("dynamic", "static")
VALID_SEED = 1234  # the validation and test pixels are drawn once, independent of `seed`
TEST_SEED = 4321


@dataclass(frozen=True)
class Crop:
    """Random ``size``×``size`` patches of stored images of shape (C, H, W), one per row, at
    positions drawn uniformly (all channels of a patch come from the same place)."""

    shape: tuple[int, int, int]
    size: int

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return (self.shape[0], self.size, self.size)

    def __call__(self, rows: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(n, C·H·W) images -> (n, C·size·size) patches; positions from ``generator``, else the
        global RNG of the rows' device."""
        n, (c, h, w), s = rows.shape[0], self.shape, self.size
        device = rows.device
        top = torch.randint(0, h - s + 1, (n, 1, 1, 1), generator=generator, device=device)
        left = torch.randint(0, w - s + 1, (n, 1, 1, 1), generator=generator, device=device)
        steps = torch.arange(s, device=device)
        images = rows.view(n, c, h, w)
        patches = images[
            torch.arange(n, device=device).view(n, 1, 1, 1),
            torch.arange(c, device=device).view(1, c, 1, 1),
            top + steps.view(1, 1, s, 1),
            left + steps.view(1, 1, 1, s),
        ]
        return patches.reshape(n, c * s * s)


@dataclass(repr=False)
class ImageData:
    """A dataset's three splits on one device, as rows of pixels.

    ``train`` holds the stored intensities (``binarize="dynamic"``: every :meth:`train_batch`
    draws fresh pixels, and fresh patch positions when ``crop`` is set) or pixels drawn once
    (``binarize="static"``: uint8 {0, 1} for binary pixels, float32 for continuous ones).
    ``valid`` and ``test`` are float32 pixel rows drawn once with fixed seeds. ``pixels`` says
    how intensities become pixels (flowvae.data.pixels); ``image_shape`` is one pixel row as an
    image, (H, W) or (C, H, W). Labels, where the dataset has them, are int64.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    binarize: str
    pixels: Pixels
    image_shape: tuple[int, ...] = (28, 28)
    crop: Crop | None = None
    train_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    test_labels: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.train.device

    @property
    def dim(self) -> int:
        """Pixels per row (D)."""
        return self.test.shape[1]

    def train_batch(self, batch_size: int) -> Tensor:
        """A (batch_size, D) float32 batch of pixels drawn with replacement.

        Uses the global torch RNG of the data's device (indices, patch positions, pixel noise),
        so restoring a checkpointed RNG state resumes exactly.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n = self.train.shape[0]
        if n == 0:
            raise DataError("the training set is empty — use a smaller valid_size")
        idx = torch.randint(0, n, (batch_size,), device=self.train.device)
        # index_select, not train[idx]: the same rows, 15x faster on CPU for a batch of 100.
        x = self.train.index_select(0, idx)
        if self.binarize == "static":
            return x.float()
        if self.crop is not None:
            x = self.crop(x)
        return self.pixels.draw(x.float())

    def __repr__(self) -> str:
        return (
            f"ImageData(train={tuple(self.train.shape)}, valid={tuple(self.valid.shape)}, "
            f"test={tuple(self.test.shape)}, binarize={self.binarize!r}, "
            f"pixels={self.pixels.kind!r}, image_shape={self.image_shape}, device={self.device})"
        )


def check_binarize(binarize: str) -> None:
    if binarize not in BINARIZE_MODES:
        raise DataError(f"binarize must be 'dynamic' or 'static', got {binarize!r}")


def check_valid_size(valid_size: object, n_train: int) -> int:
    """``valid_size`` as an int in [0, n_train), or a one-line DataError."""
    if isinstance(valid_size, bool) or not isinstance(valid_size, int):
        raise DataError(f"valid_size must be an integer, got {valid_size!r}")
    if not 0 <= valid_size < n_train:
        raise DataError(
            f"valid_size must be between 0 and {n_train - 1} (the last valid_size of the "
            f"{n_train} training images are held out), got {valid_size}"
        )
    return valid_size


def _draw_once(images: Tensor, pixels: Pixels, crop: Crop | None, seed: int) -> Tensor:
    """Pixels (and patch positions) drawn once with a local generator (the global RNG is
    untouched)."""
    gen = torch.Generator().manual_seed(seed)
    if crop is not None:
        images = crop(images, gen)
    return pixels.draw(images.float(), gen)


def build(
    train: Tensor,
    valid: Tensor,
    test: Tensor,
    *,
    image_shape: Sequence[int],
    binarize: str = "dynamic",
    pixels: str = "binary",
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    patch: int | None = None,
    labels: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
) -> ImageData:
    """The splits' intensities (CPU, one image of shape ``image_shape`` per row, uint8 0..255 or
    float32 in [0, 1]) -> :class:`ImageData` on ``device``.

    Validation and test pixels are drawn once with the fixed seeds 1234 and 4321 (independent of
    ``seed``); ``seed`` only sets the one-off draw of the training set when ``binarize="static"``.
    With ``patch`` every row becomes one ``patch``×``patch`` patch of its (C, H, W) image.
    """
    check_binarize(binarize)
    kind = make_pixels(pixels, train, eps)
    crop = Crop(tuple(image_shape), patch) if patch else None
    if binarize == "static":
        train = _draw_once(train, kind, crop, seed).to(kind.static_dtype)
    else:
        train = train.clone()  # do not keep a whole file alive through a view
    train_labels, valid_labels, test_labels = (
        t.to(device) if t is not None else None for t in labels
    )
    return ImageData(
        train=train.to(device),
        valid=_draw_once(valid, kind, crop, VALID_SEED).to(device),
        test=_draw_once(test, kind, crop, TEST_SEED).to(device),
        binarize=binarize,
        pixels=kind,
        image_shape=crop.patch_shape if crop is not None else tuple(image_shape),
        crop=None if binarize == "static" else crop,
        train_labels=train_labels,
        valid_labels=valid_labels,
        test_labels=test_labels,
    )
