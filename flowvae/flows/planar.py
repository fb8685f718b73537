"""Planar flow (Rezende & Mohamed 2015, eqs. 10-13 and appendix A.1).

    f(z) = z + û · tanh(wᵀz + b)
    log|det ∂f/∂z| = log|1 + ûᵀψ(z)|,   ψ(z) = tanh'(wᵀz + b) · w

Invertibility needs wᵀû > -1. The paper's fix projects u onto that set:

    û = u + [m(wᵀu) - wᵀu] · w / ‖w‖²,   m(x) = -1 + softplus(x)

so that wᵀû = m(wᵀu). The correction term has size |m(wᵀu) - wᵀu| / ‖w‖, which is unbounded
as ‖w‖ → 0; with a free offset b the layer then translates z by up to ~tanh(b)/‖w‖. An encoder
that emits a small w for some input sends that input's latent code arbitrarily far away, which
is how amortised planar VAEs blow up. flowvae therefore parameterises the offset in z units,
b = ‖w‖·b̃, i.e. tanh(‖w‖(ŵᵀz + b̃)): the same family of maps, but since |tanh(x)| <= |x| the
displacement is bounded by ‖u‖ + |m - wᵀu|·(|ŵᵀz| + |b̃|) whatever ‖w‖ is.

In floating point softplus(x) underflows to 0 for x ≲ -745 (float64) and the layer would become
singular, so flowvae keeps a margin: m(x) = -1 + softplus(x) + SLACK.
The log-det is then written as log(t² + s·(1 - t²)) with t = tanh(a), s = softplus(wᵀu) + SLACK,
which is 1 + m·tanh'(a) without cancellation. The inverse solves the scalar equation
a + m·tanh(a) = wᵀy + b (strictly increasing in a) with safeguarded Newton steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.base import Flow, batch_dot
from flowvae.flows.planar_stack import BLOCK, MAX_COUPLING_ELEMENTS, planar_stack_forward
from flowvae.flows.registry import FLOWS

#: Margin that keeps wᵀû >= -1 + SLACK (and so |det J| >= SLACK) in finite precision.
SLACK = 1e-3

#: log(e - 1): the shift of softplus's argument that makes m(0) = 0 (option identity_init).
IDENTITY_SHIFT = math.log(math.e - 1.0)

#: Run a homogeneous stack as one node (planar_stack.py); False runs it layer by layer through the
#: reference ops below, which is what the tests compare it against.
STACKED = True


def planar_slack(u: Tensor, w: Tensor, shift: float = 0.0) -> Tensor:
    """s = 1 + wᵀû = softplus(wᵀu + shift) + SLACK > 0, shape (B,)."""
    return F.softplus(batch_dot(w, u) + shift) + SLACK


def planar_uhat(u: Tensor, w: Tensor, shift: float = 0.0) -> Tensor:
    """The invertibility-constrained û with wᵀû = -1 + softplus(wᵀu) + SLACK."""
    wu = batch_dot(w, u)
    m = planar_slack(u, w, shift) - 1.0
    w_sq = batch_dot(w, w).clamp_min(torch.finfo(w.dtype).tiny)
    return u + ((m - wu) / w_sq).unsqueeze(-1) * w


def planar_preactivation(z: Tensor, w: Tensor, b: Tensor, scaled_offset: bool = True) -> Tensor:
    """wᵀz + ‖w‖·b̃ (offset in z units, see the module docstring), or the paper's wᵀz + b."""
    if not scaled_offset:
        return batch_dot(z, w) + b[:, 0]
    norm = batch_dot(w, w).clamp_min(torch.finfo(w.dtype).tiny).sqrt()
    return batch_dot(z, w) + norm * b[:, 0]


def planar_forward(
    z: Tensor, u: Tensor, w: Tensor, b: Tensor, scaled_offset: bool = True, shift: float = 0.0
) -> tuple[Tensor, Tensor]:
    """f(z) and log|det ∂f/∂z| for u, w of shape (B|1, D) and b̃ of shape (B|1, 1)."""
    u_hat = planar_uhat(u, w, shift)
    t = torch.tanh(planar_preactivation(z, w, b, scaled_offset))
    s = planar_slack(u, w, shift)
    z_next = z + u_hat * t.unsqueeze(-1)
    t_sq = t * t
    log_det = torch.log(t_sq + s * (1.0 - t_sq))
    return z_next, log_det.expand(z.shape[0])


def planar_inverse(
    y: Tensor,
    u: Tensor,
    w: Tensor,
    b: Tensor,
    scaled_offset: bool = True,
    shift: float = 0.0,
    iterations: int = 200,
) -> Tensor:
    """z with f(z) = y: solve a + m tanh(a) = wᵀy + ‖w‖b̃, then z = y - û tanh(a)."""
    u_hat = planar_uhat(u, w, shift)
    m = (planar_slack(u, w, shift) - 1.0).expand(y.shape[0])
    c = planar_preactivation(y, w, b, scaled_offset)
    with torch.no_grad():
        c_, m_ = c.detach(), m.detach()
        # |m tanh(a)| <= |m| brackets the root; g(a) = a + m tanh(a) - c is increasing.
        lo, hi = c_ - m_.abs(), c_ + m_.abs()
        a = c_.clone()
        dx = dx_old = hi - lo
        for _ in range(iterations):
            t = torch.tanh(a)
            g = a + m_ * t - c_
            lo = torch.where(g < 0, a, lo)
            hi = torch.where(g > 0, a, hi)
            step = g / (t * t + (1.0 + m_) * (1.0 - t * t))
            cand = a - step
            # A Newton step must also halve the step before last, else bisect (as rtsafe does):
            # with a large m, Newton can bounce between the flat ends of tanh, inside the
            # bracket but shrinking it too slowly to reach the root in `iterations` steps.
            slow = 2.0 * step.abs() > dx_old.abs()
            bad = ~torch.isfinite(cand) | (cand <= lo) | (cand >= hi) | slow
            a_next = torch.where(bad, 0.5 * (lo + hi), cand)
            dx_old, dx = dx, torch.where(bad, 0.5 * (hi - lo), step)
            if torch.equal(a_next, a):
                break
            a = a_next
    return y - u_hat * torch.tanh(a).unsqueeze(-1)


@FLOWS.register("planar")
class Planar(Flow):
    """Planar flow f(z) = z + û tanh(wᵀz + b) with the paper's invertibility constraint."""

    exact_inverse = False

    def __init__(
        self,
        dim: int,
        *,
        amortized: bool = False,
        index: int = 0,
        offset: str = "scaled",
        identity_init: bool = False,
    ) -> None:
        if offset not in ("scaled", "free"):
            raise ValueError(f"planar offset must be 'scaled' or 'free', got {offset!r}")
        # "free" is the paper's raw b, kept to reproduce the amortised instability it causes.
        self.scaled_offset = offset == "scaled"
        # m(x) = -1 + softplus(x + log(e - 1)) has m(0) = 0: a layer with small u, w is then
        # close to the identity, instead of contracting z by 1 + m(0) = log 2 along w (which
        # compounds to 0.69^K at initialisation in a deep amortised stack).
        self.shift = IDENTITY_SHIFT if identity_init else 0.0
        super().__init__(dim, amortized=amortized, index=index)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"u": (self.dim,), "w": (self.dim,), "b": (1,)}

    def init_param(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name == "b":
            return torch.zeros(shape)
        return super().init_param(name, shape)

    def transform(self, z: Tensor, u: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return planar_forward(z, u, w, b, self.scaled_offset, self.shift)

    def inverse_transform(self, y: Tensor, u: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return planar_inverse(y, u, w, b, self.scaled_offset, self.shift)

    @classmethod
    def stack_forward(
        cls, layers: list[Flow], z: Tensor, params: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        first = layers[0]
        k = len(layers)
        if not STACKED or any(
            (x.scaled_offset, x.shift) != (first.scaled_offset, first.shift) for x in layers
        ):
            return None
        # The stacked path keeps every layer's state for the backward pass; for deep stacks on
        # very large batches the layers run one by one instead.
        if z.shape[0] * k * min(k, BLOCK) > MAX_COUPLING_ELEMENTS:
            return None
        packed = cls.packed_params(layers, params)
        return planar_stack_forward(z, packed, first.scaled_offset, SLACK, first.shift)

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        cases = []
        for kind in ("tiny_w", "wu_plus", "wu_minus", "huge_b"):
            u = torch.randn(batch, dim, generator=gen, dtype=dtype)
            w = torch.randn(batch, dim, generator=gen, dtype=dtype)
            b = torch.randn(batch, 1, generator=gen, dtype=dtype)
            if kind == "tiny_w":
                w = 1e-8 * w / w.norm(dim=1, keepdim=True)
            elif kind in ("wu_plus", "wu_minus"):
                sign = 1.0 if kind == "wu_plus" else -1.0
                # project u so that wᵀu = ±1e4 exactly (up to rounding)
                w_sq = (w * w).sum(1, keepdim=True)
                u = u - ((w * u).sum(1, keepdim=True) - sign * 1e4) / w_sq * w
            else:
                b = 1e3 * b
            cases.append(torch.cat([u, w, b], dim=1))
        return cases
