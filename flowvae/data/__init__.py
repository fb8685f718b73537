"""Datasets for the VAE experiment, one module each, registered in ``DATASETS`` on import.

- ``mnist``, ``fashion_mnist``: the IDX files (mnist.py, fashion_mnist.py);
- ``omniglot``: the 28×28 ``chardata.mat`` of the IWAE papers (omniglot.py);
- ``cifar10_patches``: 3×8×8 patches of CIFAR-10's binary release (cifar10.py);
- ``npz``: your own arrays (npz.py).

Every loader returns :class:`ImageData`; how intensities become pixels (binary or continuous)
follows the likelihood (flowvae.data.pixels, flowvae.likelihoods).
"""

from __future__ import annotations

from . import cifar10, fashion_mnist, mnist, npz, omniglot  # noqa: F401  (registration)
from .catalog import DATASETS, DatasetEntry, data_root
from .images import ImageData
from .mnist import BinaryMNIST, default_root, ensure_files, load_mnist

__all__ = [
    "DATASETS",
    "BinaryMNIST",
    "DatasetEntry",
    "ImageData",
    "data_root",
    "default_root",
    "ensure_files",
    "load_mnist",
]
