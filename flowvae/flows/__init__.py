"""Normalizing flows behind one registry.

>>> from flowvae import flows
>>> flows.available()                       # doctest: +SKIP
['nice', 'planar', 'radial', ...]
>>> stack = flows.build("planar", dim=2, k=8)
>>> z, log_det = stack(torch.randn(16, 2))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect

from flowvae.flows import (  # noqa: F401  (registration side effects)
    affine_coupling,
    householder,
    iaf,
    nice,
    planar,
    radial,
    sylvester,
)
from flowvae.flows.affine_coupling import AffineCoupling
from flowvae.flows.base import Flow
from flowvae.flows.householder import Householder
from flowvae.flows.iaf import IAF
from flowvae.flows.nice import NICE
from flowvae.flows.planar import Planar
from flowvae.flows.radial import Radial
from flowvae.flows.registry import FLOWS
from flowvae.flows.stack import FlowStack
from flowvae.flows.sylvester import (
    Sylvester,
    SylvesterHouseholder,
    SylvesterOrthogonal,
    SylvesterTriangular,
)
from flowvae.registry import unknown_name

__all__ = [
    "AffineCoupling",
    "FLOWS",
    "Flow",
    "FlowStack",
    "Householder",
    "IAF",
    "NICE",
    "Planar",
    "Radial",
    "Sylvester",
    "SylvesterHouseholder",
    "SylvesterOrthogonal",
    "SylvesterTriangular",
    "available",
    "build",
    "get",
]


def available() -> list[str]:
    """Names of the registered flow families."""
    return FLOWS.names()


def get(name: str) -> type[Flow]:
    """The flow class registered under ``name`` (did-you-mean error otherwise)."""
    return FLOWS.get(name)


def option_names(name: str) -> list[str]:
    """Keyword options a family accepts beyond dim/amortized/index."""
    params = inspect.signature(get(name).__init__).parameters
    return [p for p in params if p not in ("self", "dim", "amortized", "index")]


def build(name: str, dim: int, k: int, amortized: bool = False, **options) -> FlowStack:
    """A stack of ``k`` layers of family ``name`` in dimension ``dim``.

    ``stack.num_params`` is the per-example parameter count consumed when ``amortized``
    (0 otherwise); ``stack(z, params=None)`` returns ``(z_k, log_abs_det)`` and
    ``stack.inverse(y, params=None)`` maps back.
    """
    cls = get(name)
    if k < 0:
        raise ValueError(f"flow depth k must be >= 0, got {k}")
    allowed = option_names(name)
    for key in options:
        if key not in allowed:
            raise ValueError(
                unknown_name(f"unknown option '{key}' for flow '{name}'", key, allowed)
            )
    layers = [cls(dim, amortized=amortized, index=i, **options) for i in range(k)]
    return FlowStack(layers, dim=dim, amortized=amortized)
