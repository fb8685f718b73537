"""The dataset registry: one entry per dataset, with what `flowvae list` and reports show.

Each dataset module writes down, next to its reader, the canonical source, the files and their
checksums, the split and the preprocessing, and registers one :class:`DatasetEntry` built from
them. Every loader is flowvae.data.loader's ``load_dataset`` over the module's reader, so all
take the same keywords and return a :class:`flowvae.data.images.ImageData`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowvae.paper import PaperTable
from flowvae.registry import Registry

__all__ = ["DATASETS", "DatasetEntry", "data_root"]


@dataclass(frozen=True)
class DatasetEntry:
    #: The loader: keywords as in the module docstring, returns ImageData.
    load: Callable[..., Any]
    #: The likelihood a config without model.likelihood uses.
    likelihood: str
    #: What reports call it ("binarised MNIST").
    title: str
    #: Where the files come from (URLs, or "your file").
    source: str
    #: File names and checksums.
    files: str
    #: Train / validation / test, and the default validation size.
    split: str
    #: How files become pixels.
    preprocessing: str
    #: The paper's table of −log p(x) that reports put beside measured values, if any.
    paper: PaperTable | None = None


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def data_root(folder: str) -> Path:
    """Where a dataset's files live by default: ``$FLOWVAE_DATA/<folder>`` if FLOWVAE_DATA is
    set, else ``~/.cache/flowvae/<folder>``."""
    env = os.environ.get("FLOWVAE_DATA")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "flowvae"
    return base / folder
