"""Datasets: binarised MNIST, with a registry for the CLI."""

from __future__ import annotations

from ..registry import Registry
from .mnist import BinaryMNIST, default_root, ensure_files, load_mnist

__all__ = ["DATASETS", "BinaryMNIST", "default_root", "ensure_files", "load_mnist"]

DATASETS: Registry = Registry("dataset")
DATASETS.register("mnist")(load_mnist)
