"""How stored intensities become the pixels a likelihood scores, one kind per likelihood family.

Datasets store intensities: uint8 0..255 (8-bit images) or float32 in [0, 1] (e.g. Omniglot's
grey levels). A likelihood names the kind of pixels it scores (flowvae.likelihoods):

- ``binary``: a Bernoulli draw per pixel with probability intensity / 255 (or the float itself);
- ``continuous``: 8-bit values k are dequantised with u ~ U[0, 1) and squeezed into (ε, 1 − ε),
  x = ε + (1 − 2ε)·(k + u)/256; floats in [0, 1] are only squeezed, x = ε + (1 − 2ε)·v.

Each kind also says what its −log p(x) means beyond nats (``metrics``): nothing more for binary
pixels; bits/dim in the (ε, 1 − ε) space and, for 8-bit sources, in the 256-level space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flowvae.errors import DataError
from flowvae.likelihoods import bits_per_dim, bits_per_dim_8bit

__all__ = ["DEFAULT_EPS", "PIXELS", "BinaryPixels", "ContinuousPixels", "Pixels", "make_pixels"]

#: Continuous pixels lie in (ε, 1 − ε), so their logits stay finite (|logit| ≤ 6.9).
DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class Pixels:
    """``levels``: 256 for uint8 intensities, None for floats already in [0, 1]; ``eps``: the
    squeeze of continuous pixels (unused by binary ones)."""

    levels: int | None
    eps: float = DEFAULT_EPS
    kind: ClassVar[str] = ""
    #: dtype of a training set drawn once (data.binarize: static)
    static_dtype: ClassVar[torch.dtype] = torch.float32

    def __post_init__(self) -> None:
        if not 0 < self.eps < 0.5:
            raise DataError(
                f"data.eps must lie in (0, 0.5) (pixels go to (eps, 1 - eps)), got {self.eps}"
            )

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels from float intensities ``x`` (overwritten); noise from ``generator``, else the
        global RNG of x's device."""
        raise NotImplementedError

    def metrics(self, nll: float, nll_stderr: float, dim: int) -> dict[str, float]:
        """What −log p(x) (nats per image of ``dim`` pixels) means in other units."""
        raise NotImplementedError


class BinaryPixels(Pixels):
    """x_i ~ Bernoulli(intensity_i / 255), or Bernoulli(v_i) for floats v_i ∈ [0, 1]."""

    kind = "binary"
    static_dtype = torch.uint8

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        scale = 255.0 if self.levels else 1.0
        # u < p with one uniform per pixel is how torch.bernoulli draws on the CPU, so this is
        # its result and RNG state to the bit there, at under half the time (its kernel runs
        # element by element).
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return u.lt_(x.div_(scale))

    def metrics(self, nll: float, nll_stderr: float, dim: int) -> dict[str, float]:  # noqa: ARG002
        return {}  # nats are the unit of binarised-image benchmarks


class ContinuousPixels(Pixels):
    """x = ε + (1 − 2ε)·(k + u)/256 with u ~ U[0, 1) for 8-bit k, x = ε + (1 − 2ε)·v for floats."""

    kind = "continuous"

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.levels:
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x.add_(u).div_(self.levels)
        return x.mul_(1 - 2 * self.eps).add_(self.eps)

    def metrics(self, nll: float, nll_stderr: float, dim: int) -> dict[str, float]:
        """bits/dim over x ∈ (ε, 1 − ε)^D and, for 8-bit sources, over the dequantised 256-level
        pixels (see flowvae.likelihoods.bits_per_dim_8bit)."""
        out = {
            "bits_per_dim": bits_per_dim(nll, dim),
            "bits_per_dim_stderr": bits_per_dim(nll_stderr, dim),
        }
        if self.levels:
            out["bits_per_dim_8bit"] = bits_per_dim_8bit(nll, dim, self.eps, self.levels)
        return out


PIXELS: dict[str, type[Pixels]] = {cls.kind: cls for cls in (BinaryPixels, ContinuousPixels)}


def make_pixels(kind: str, source: Tensor, eps: float = DEFAULT_EPS) -> Pixels:
    """The ``kind`` of pixels ("binary" or "continuous") for intensities stored like ``source``
    (uint8: 256 levels; floating point: values in [0, 1])."""
    return PIXELS[kind](levels=256 if source.dtype == torch.uint8 else None, eps=eps)
