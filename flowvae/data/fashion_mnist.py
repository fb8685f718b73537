"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): MNIST's format and sizes, Zalando's pictures.

Source: the four gzipped IDX files of zalandoresearch/fashion-mnist (GitHub, then the S3
website), each checked against the SHA256 below. Split and preprocessing as for MNIST
(:mod:`flowvae.data.mnist`): the last valid_size (default 10,000) training images validate;
binarised dynamically or statically, or dequantised for a continuous likelihood.
"""

from __future__ import annotations

from functools import partial

from .catalog import DATASETS
from .mnist import (
    FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    IdxSource,
    idx_entry,
    load_idx_dataset,
)

__all__ = ["FASHION_MNIST", "FILES", "MIRRORS", "SHA256", "load_fashion_mnist"]

MIRRORS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

#: SHA256 of the gzipped files (their MD5s are the ones the fashion-mnist README publishes).
SHA256: dict[str, str] = {
    TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

FASHION_MNIST = IdxSource("Fashion-MNIST", "fashion_mnist", SHA256, MIRRORS)


#: Fashion-MNIST from ``root`` (default ``$FLOWVAE_DATA/fashion_mnist`` or
#: ``~/.cache/flowvae/fashion_mnist``), downloading missing files; as :func:`load_mnist`.
load_fashion_mnist = partial(load_idx_dataset, FASHION_MNIST)

DATASETS.register("fashion_mnist")(
    idx_entry(FASHION_MNIST, load_fashion_mnist, "binarised Fashion-MNIST", "Xiao et al. 2017")
)
