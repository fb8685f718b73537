"""Datasets for the VAE experiment, one module each, registered in ``DATASETS`` on import.

- ``mnist``, ``fashion_mnist``: the IDX files (mnist.py, fashion_mnist.py);
- ``omniglot``: the 28×28 ``chardata.mat`` of the IWAE papers (omniglot.py);
- ``cifar10_patches``: 3×8×8 patches of CIFAR-10's binary release (cifar10.py);
- ``npz``: your own arrays (npz.py).

A dataset module only reads its files into raw splits; one function, flowvae.data.loader's
``load_dataset``, splits them and builds the :class:`ImageData` every loader returns. How
intensities become pixels (binary or continuous) follows the likelihood (flowvae.data.pixels,
flowvae.likelihoods).
"""

from __future__ import annotations

from . import cifar10, fashion_mnist, mnist, npz, omniglot  # noqa: F401  (registration)
from .catalog import DATASETS, DatasetEntry, data_root
from .images import ImageData
from .loader import Fetch, RawSplits, load_dataset
from .mnist import default_root, ensure_files, load_mnist

__all__ = [
    "DATASETS",
    "Fetch",
    "RawSplits",
    "DatasetEntry",
    "ImageData",
    "data_root",
    "default_root",
    "ensure_files",
    "load_dataset",
    "load_mnist",
]
