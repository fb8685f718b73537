"""Sylvester normalizing flows (van den Berg, Hasenclever, Tomczak & Welling, UAI 2018,
arXiv 1803.05649).

    f(z) = z + Q R₁ h(R₂ Qᵀ z + b),   h = tanh
    log|det ∂f/∂z| = Σᵢ log|1 + R₁,ᵢᵢ R₂,ᵢᵢ h'(R₂ Qᵀ z + b)ᵢ|

Q is D×M with orthonormal columns and R₁, R₂ are M×M upper triangular, so by Sylvester's
determinant identity det(I_D + Q R₁ diag(h') R₂ Qᵀ) = det(I_M + R₁ diag(h') R₂), whose matrix is
upper triangular. Three ways of building Q give three registered families:

* ``sylvester_orthogonal`` (O-SNF): M ≤ D columns orthonormalised by Björck's iteration.
* ``sylvester_householder`` (H-SNF): Q = H₁⋯H_H, a product of Householder reflections, M = D.
* ``sylvester_triangular`` (T-SNF): Q = I on even layers, the reversal permutation on odd, M = D.

Invertibility needs 1 + R₁,ᵢᵢ R₂,ᵢᵢ h' > 0 for all h' ∈ (0, 1], i.e. R₁,ᵢᵢ R₂,ᵢᵢ > -1. The
reference code bounds both diagonals with tanh; in floating point tanh(±50) is exactly ±1 and the
determinant would hit 0, so flowvae keeps a margin SLACK:

    R₁,ᵢᵢ = tanh(αᵢ),   R₂,ᵢᵢ = (1 - SLACK) tanh(βᵢ)   ⇒   R₁,ᵢᵢ R₂,ᵢᵢ ≥ -1 + SLACK.

Off-diagonal entries are the raw values divided by √M (see :func:`upper_triangular`). The
factor sᵢ = 1 + R₁,ᵢᵢ R₂,ᵢᵢ is evaluated without cancellation through
1 + tanh α tanh β = cosh(α + β) / (cosh α cosh β), and each log-det term as
log(t² + sᵢ (1 - t²)) with t = tanh(aᵢ), the same form as the planar flow.

The map is not analytically invertible. With q = Qᵀz it acts as q' = q + R₁ h(R₂ q + b) on
range(Q) and leaves the orthogonal complement alone; since R₁ and R₂ are upper triangular, qᵢ'
depends only on q_i..q_M, so the inverse back-substitutes from the last coordinate upwards, each
step a monotone scalar equation solved by safeguarded Newton as in the planar inverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flowvae.flows.base import Flow
from flowvae.flows.householder import reflect
from flowvae.flows.registry import FLOWS

#: Margin that keeps R₁,ᵢᵢ R₂,ᵢᵢ >= -1 + SLACK (so every determinant factor is >= SLACK).
SLACK = 1e-3
#: Björck iteration cap: from the scaled start every singular value grows by x1.5 per step while
#: small, so 100 steps cover a raw matrix conditioned up to ~1e15 before the quadratic phase.
BJORCK_MAX_ITER = 100


def diagonal_factor(alpha: Tensor, beta: Tensor) -> Tensor:
    """s = 1 + tanh(α)(1 - SLACK)tanh(β) = SLACK + (1 - SLACK) cosh(α+β)/(cosh α cosh β) > 0.

    With log cosh x = |x| + softplus(-2|x|) - log 2, the large parts |α+β| - |α| - |β| of the
    log-ratio cancel exactly to -2 min(|α|, |β|) (opposite signs) or 0, so they are never
    formed: subtracting log cosh values of size ~1e3 in float32 would cost ~1e-4 absolute.
    """
    a, b = alpha.abs(), beta.abs()
    exponent = torch.where(alpha * beta < 0, -2.0 * torch.minimum(a, b), torch.zeros_like(a))
    log_ratio = (
        exponent
        + math.log(2.0)
        + F.softplus(-2.0 * (alpha + beta).abs())
        - F.softplus(-2.0 * a)
        - F.softplus(-2.0 * b)
    )
    return SLACK + (1.0 - SLACK) * torch.exp(log_ratio)


def triangle_size(m: int) -> int:
    return m * (m + 1) // 2


def upper_triangular(packed: Tensor, m: int, diagonal: Tensor) -> Tensor:
    """(B, m, m) upper-triangular matrix from (B, m(m+1)/2) packed rows, diagonal replaced.

    Packing only the triangle means every raw entry is used (no dead parameters). Off-diagonal
    entries are divided by √m, so unit-scale raw parameters (what an encoder emits) give
    unit-scale rows, pre-activations and shifts whatever m, instead of saturating tanh at m = 64.
    """
    rows, cols = torch.triu_indices(m, m, device=packed.device)
    out = packed.new_zeros(packed.shape[0], m, m)
    out[:, rows, cols] = packed
    off = torch.triu(out, diagonal=1) / math.sqrt(m)
    return off + torch.diag_embed(diagonal)


def packed_diagonal(packed: Tensor, m: int) -> Tensor:
    """The raw diagonal entries of a packed triangle, shape (B, m)."""
    i = torch.arange(m, device=packed.device)
    # row i of the packed upper triangle starts at i·m - i(i-1)/2 and opens with (i, i)
    return packed[:, i * m - i * (i - 1) // 2]


def matvec(a: Tensor, x: Tensor) -> Tensor:
    """(B|1, m, n) @ (B, n) -> (B, m), broadcasting the batch axis."""
    return (a @ x.unsqueeze(-1)).squeeze(-1)


def bjorck(raw: Tensor, max_iter: int = BJORCK_MAX_ITER) -> Tensor:
    """Orthonormalise the columns of raw (B, D, M) by Björck's iteration Q ← Q (3I - QᵀQ)/2.

    The start is scaled by ‖AᵀA‖_F^(1/2) ≥ σ_max(A) so every singular value lies in (0, 1],
    inside the region (0, √3) where the iteration converges to the polar factor of A.
    Raises RuntimeError when ‖QᵀQ - I‖_F is still above tolerance after ``max_iter`` steps
    (a rank-deficient or non-finite raw matrix): silently using a non-orthogonal Q would make
    the log-determinant wrong.
    """
    m = raw.shape[-1]
    eye = torch.eye(m, dtype=raw.dtype, device=raw.device)
    gram = raw.mT @ raw
    scale = gram.norm(dim=(-2, -1), keepdim=True).sqrt().clamp_min(torch.finfo(raw.dtype).tiny)
    q = raw / scale
    if q.device.type == "meta":
        # shape inference only: there are no values to iterate on or test for convergence
        return q
    if not torch.isfinite(raw).all():
        raise RuntimeError("sylvester_orthogonal: non-finite entries in the raw Q matrix")
    tol = 32.0 * m * torch.finfo(raw.dtype).eps
    err = math.inf
    for _ in range(max_iter + 1):
        gram = q.mT @ q
        err = (gram - eye).norm(dim=(-2, -1)).max().item()
        if err <= tol:
            return q
        q = q + 0.5 * (q @ (eye - gram))
    raise RuntimeError(
        f"sylvester_orthogonal: Björck orthogonalisation did not converge in {max_iter} "
        f"iterations (max ‖QᵀQ - I‖_F = {err:.3g} > tol {tol:.3g}); the raw Q matrix of some "
        "example is (numerically) rank deficient"
    )


def solve_monotone(
    rhs: Tensor, r: Tensor, s: Tensor, c: Tensor, slope: Tensor, iterations: int = 200
) -> Tensor:
    """x with x + r tanh(s x + c) = rhs, where 1 + r s tanh' >= SLACK > 0 (increasing in x).

    ``slope`` is 1 + r s computed without cancellation. |r tanh| <= |r| brackets the root.
    """
    lo, hi = rhs - r.abs(), rhs + r.abs()
    x = rhs.clone()
    for _ in range(iterations):
        t = torch.tanh(s * x + c)
        g = x + r * t - rhs
        lo = torch.where(g < 0, x, lo)
        hi = torch.where(g > 0, x, hi)
        cand = x - g / (t * t + slope * (1.0 - t * t))
        bad = ~torch.isfinite(cand) | (cand <= lo) | (cand >= hi)
        x_next = torch.where(bad, 0.5 * (lo + hi), cand)
        if torch.equal(x_next, x):
            break
        x = x_next
    return x


class Sylvester(Flow):
    """Shared Sylvester maths; subclasses say how Q is built (``basis``/``project``/``lift``)."""

    exact_inverse = False

    def __init__(self, dim: int, *, amortized: bool = False, index: int = 0) -> None:
        # subclasses set self.m before calling this (param_shapes needs it)
        super().__init__(dim, amortized=amortized, index=index)

    # -- Q, supplied by the subclass -----------------------------------------------------------
    def basis_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def basis(self, **raw: Tensor) -> Tensor | None:  # noqa: ARG002
        """Whatever represents Q for this layer (a matrix, reflection vectors, or None)."""
        return None

    def project(self, z: Tensor, basis: Tensor | None) -> Tensor:
        """Qᵀ z, shape (B, M)."""
        raise NotImplementedError

    def lift(self, x: Tensor, basis: Tensor | None) -> Tensor:
        """Q x, shape (B, D)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        n = triangle_size(self.m)
        return {"r1": (n,), "r2": (n,), "b": (self.m,), **self.basis_shapes()}

    def init_param(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name == "b":
            return torch.zeros(shape)
        if name in ("r1", "r2"):
            return super().init_param(name, shape)
        return torch.randn(shape) / math.sqrt(self.dim)

    def triangles(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """R₁, R₂ (B|1, M, M) and the stable diagonal factors s = 1 + R₁,ᵢᵢR₂,ᵢᵢ (B|1, M)."""
        alpha, beta = packed_diagonal(r1, self.m), packed_diagonal(r2, self.m)
        big_r1 = upper_triangular(r1, self.m, torch.tanh(alpha))
        big_r2 = upper_triangular(r2, self.m, (1.0 - SLACK) * torch.tanh(beta))
        return big_r1, big_r2, diagonal_factor(alpha, beta)

    def transform(
        self, z: Tensor, r1: Tensor, r2: Tensor, b: Tensor, **raw: Tensor
    ) -> tuple[Tensor, Tensor]:
        basis = self.basis(**raw)
        big_r1, big_r2, s = self.triangles(r1, r2)
        t = torch.tanh(matvec(big_r2, self.project(z, basis)) + b)
        z_next = z + self.lift(matvec(big_r1, t), basis)
        t_sq = t * t
        log_det = torch.log(t_sq + s * (1.0 - t_sq)).sum(-1)
        return z_next, log_det.expand(z.shape[0])

    def inverse_transform(
        self, y: Tensor, r1: Tensor, r2: Tensor, b: Tensor, **raw: Tensor
    ) -> Tensor:
        basis = self.basis(**raw)
        big_r1, big_r2, s = self.triangles(r1, r2)
        q_y = self.project(y, basis)
        with torch.no_grad():
            n = y.shape[0]
            r1_, r2_ = big_r1.detach().expand(n, -1, -1), big_r2.detach().expand(n, -1, -1)
            b_, s_, qy_ = b.detach().expand(n, -1), s.detach().expand(n, -1), q_y.detach()
            q = torch.zeros_like(qy_)
            t = torch.zeros_like(qy_)
            for i in reversed(range(self.m)):
                # unsolved entries of q and t are still 0, so full rows give the j > i sums
                c = (r2_[:, i, :] * q).sum(-1) + b_[:, i]
                rhs = qy_[:, i] - (r1_[:, i, :] * t).sum(-1)
                q[:, i] = solve_monotone(rhs, r1_[:, i, i], r2_[:, i, i], c, s_[:, i])
                t[:, i] = torch.tanh(r2_[:, i, i] * q[:, i] + c)
        # the component of y outside range(Q) is untouched by the forward map
        return y + self.lift(q - q_y, basis)


@FLOWS.register("sylvester_orthogonal")
class SylvesterOrthogonal(Sylvester):
    """O-SNF: Q has ``m`` orthonormal columns (default min(dim, 8)), from Björck's iteration."""

    def __init__(
        self, dim: int, *, amortized: bool = False, index: int = 0, m: int | None = None
    ) -> None:
        self.m = min(int(dim), 8) if m is None else int(m)
        if not 1 <= self.m <= dim:
            raise ValueError(f"sylvester_orthogonal needs 1 <= m <= dim={dim}, got m={self.m}")
        super().__init__(dim, amortized=amortized, index=index)

    def basis_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"q": (self.dim, self.m)}

    def basis(self, q: Tensor) -> Tensor:
        return bjorck(q)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"

    def project(self, z: Tensor, basis: Tensor) -> Tensor:
        return (z.unsqueeze(1) @ basis).squeeze(1)

    def lift(self, x: Tensor, basis: Tensor) -> Tensor:
        return matvec(basis, x)

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        m = min(dim, 8)
        return sylvester_stress(dim, m, batch, dtype, basis="orthogonal")


@FLOWS.register("sylvester_householder")
class SylvesterHouseholder(Sylvester):
    """H-SNF: Q = H₁⋯H_H with ``reflections`` Householder vectors (default min(dim, 8)), M = D."""

    def __init__(
        self,
        dim: int,
        *,
        amortized: bool = False,
        index: int = 0,
        reflections: int | None = None,
    ) -> None:
        self.m = int(dim)
        self.reflections = min(int(dim), 8) if reflections is None else int(reflections)
        if self.reflections < 1:
            raise ValueError(
                f"sylvester_householder needs reflections >= 1, got {self.reflections}"
            )
        super().__init__(dim, amortized=amortized, index=index)

    def basis_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"v": (self.reflections, self.dim)}

    def basis(self, v: Tensor) -> Tensor:
        return v

    def project(self, z: Tensor, basis: Tensor) -> Tensor:
        # Qᵀ = H_H ⋯ H₁ (each Hₖ symmetric): H₁ acts first
        for k in range(self.reflections):
            z = reflect(z, basis[:, k])
        return z

    def lift(self, x: Tensor, basis: Tensor) -> Tensor:
        for k in reversed(range(self.reflections)):
            x = reflect(x, basis[:, k])
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reflections={self.reflections}"

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        return sylvester_stress(dim, dim, batch, dtype, basis="householder")


@FLOWS.register("sylvester_triangular")
class SylvesterTriangular(Sylvester):
    """T-SNF: Q = I on even layer indices and the reversal permutation on odd ones, M = D."""

    def __init__(self, dim: int, *, amortized: bool = False, index: int = 0) -> None:
        self.m = int(dim)
        super().__init__(dim, amortized=amortized, index=index)

    def project(self, z: Tensor, basis: None) -> Tensor:  # noqa: ARG002  (Q is a permutation)
        return z.flip(-1) if self.index % 2 else z

    def lift(self, x: Tensor, basis: None) -> Tensor:  # noqa: ARG002
        return x.flip(-1) if self.index % 2 else x

    @classmethod
    def stress_params(cls, dim: int, batch: int, dtype: torch.dtype) -> list[Tensor]:
        return sylvester_stress(dim, dim, batch, dtype, basis="triangular")


def sylvester_stress(dim: int, m: int, batch: int, dtype: torch.dtype, basis: str) -> list[Tensor]:
    """Raw parameter vectors at the edges: saturated diagonals, huge b, badly scaled Q.

    Raw off-diagonals are unit scale (entries 1/√M after the parameterisation), and 1e-3 where
    the diagonal factors sit at the margin: factors near SLACK with O(1) off-diagonals give a
    triangular Jacobian whose condition number grows like (1/SLACK)^M, which no float64 inverse
    or reference determinant can resolve; that is a property of the map, not what these probe.
    """
    gen = torch.Generator().manual_seed(0)
    n = triangle_size(m)
    rows, cols = torch.triu_indices(m, m)
    diag = rows == cols

    def randn(*shape: int) -> Tensor:
        return torch.randn(batch, *shape, generator=gen, dtype=dtype)

    def basis_raw(kind: str) -> Tensor:
        if basis == "orthogonal":
            q = randn(dim, m)
            if kind == "scaled":
                q = 1e3 * q
                q[:, :, 0] *= 1e-3  # one column a thousand times shorter than the rest
            return q.flatten(1)
        if basis == "householder":
            v = randn(min(dim, 8), dim)
            if kind == "scaled":
                v[:, 0] *= 1e-20  # a near-zero reflection vector
                v[:, -1] *= 1e3
            return v.flatten(1)
        return randn(0)

    def triangle(diag_value: Tensor, off_scale: float = 1.0) -> Tensor:
        r = randn(n) * off_scale
        r[:, diag] = diag_value
        return r

    def full(value: float) -> Tensor:
        return torch.full((batch, m), value, dtype=dtype)

    cases = []
    # tanh(α) = ±1 against (1 - SLACK)tanh(β) = ∓1: each factor is SLACK where h' = 1
    for sign in (1.0, -1.0):
        r1, r2 = triangle(full(50.0 * sign), 1e-3), triangle(full(-50.0 * sign), 1e-3)
        cases.append(torch.cat([r1, r2, torch.zeros(batch, m, dtype=dtype), basis_raw("")], 1))
    # both saturated the same way: expanding, factors near 2
    r1, r2 = triangle(full(1e3)), triangle(full(1e3))
    cases.append(torch.cat([r1, r2, randn(m), basis_raw("scaled")], 1))
    # huge shifts saturate h (even for |z| ~ 1e3); huge diagonals of random sign
    r1, r2 = triangle(1e3 * randn(m)), triangle(50.0 * randn(m))
    b = 1e4 * torch.sign(randn(m))
    cases.append(torch.cat([r1, r2, b, basis_raw("scaled")], 1))
    return cases
