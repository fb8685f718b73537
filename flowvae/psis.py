"""Diagnostics for importance-sampled estimates such as the VAE's -log p(x).

For each image the estimator averages S weights w_s = p(x, z_s) / q(z_s | x), given here as
log-weights (rows of ``log_w``, shape (N, S)). Two diagnostics say whether that average can be
trusted:

* Effective sample size, ESS = (Σ w)² / Σ w², between 1 (one weight dominates) and S (equal
  weights). It is computed from log-weights as exp(2·logsumexp(log_w) - logsumexp(2·log_w)).
* The Pareto k̂ of Pareto-smoothed importance sampling (PSIS): a generalised Pareto distribution
  (GPD), P(w - u > t | w > u) = (1 + k·t/σ)^(-1/k), is fitted to the M largest weights above the
  threshold u, the (M+1)-th largest, with M = min(ceil(S/5), ceil(3·sqrt(S))). The fit is Zhang
  & Stephens' (2009) empirical-Bayes estimator as in loo / ArviZ, shrunk towards 0.5 by
  k ← (M·k + 5) / (M + 10). The weights then have finite moments of order < 1/k: for k > 0.5
  the variance is infinite and the estimate converges slowly (CLT no longer applies); for
  k > 0.7 the number of draws needed grows so fast that, in practice, the estimate is
  unreliable, and the ESS itself, being estimated from the same weights, is too optimistic.
  (Vehtari et al. 2024 refine 0.7 to min(1 - 1/log10(S), 0.7) for small S.)

Smoothing replaces the M tail weights, in order, by the fitted GPD's quantiles at (z - 0.5)/M,
z = 1..M, capped at the row's largest raw weight.

References: A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto smoothed importance
sampling", JMLR 25 (2024); J. Zhang, M. A. Stephens, "A new and efficient estimation method for
the generalized Pareto distribution", Technometrics 51 (2009).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Below this many tail points the GPD fit is meaningless (loo and ArviZ use the same bound).
MIN_TAIL = 5


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size (Σw)²/Σw² of each row of ``log_w`` (shape (N, S) -> (N,), or
    (S,) -> scalar)."""
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def tail_length(s: int) -> int:
    """The paper's M = min(ceil(S/5), ceil(3·sqrt(S))) tail weights used in the fit."""
    return min(math.ceil(s / 5), math.ceil(3 * math.sqrt(s)))


def _gpd_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Zhang & Stephens' fit of a GPD to the rows of ``x`` (exceedances, sorted ascending,
    largest > 0). Returns the shape k (shrunk towards 0.5) and the scale σ, each (N,)."""
    n = x.shape[-1]
    m = 30 + math.isqrt(n)
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    # ZS's grid of θ = -k/σ, spread around 1/max by the first quartile; the quartile is clamped
    # so that ties at the threshold cannot divide by zero.
    quartile = x[:, int(n / 4 + 0.5) - 1].clamp_min(1e-12 * x[:, -1])
    theta = 1 / x[:, -1:] + (1 - torch.sqrt(m / (j - 0.5))) / (3 * quartile[:, None])  # (N, m)
    # θ < 1/max, so 1 - θx > 0 on the whole grid.
    k = torch.log1p(-theta[:, :, None] * x[:, None, :]).mean(-1)
    profile = n * (torch.log(-theta / k) - k - 1)
    theta_hat = (torch.softmax(profile, -1) * theta).sum(-1)
    k_hat = torch.log1p(-theta_hat[:, None] * x).mean(-1)
    sigma = -k_hat / theta_hat
    # The weakly informative prior matters only for short tails; it keeps k̂ away from the
    # extreme values that a few points can produce.
    return (n * k_hat + 10 * 0.5) / (n + 10), sigma


def _gpd_quantile(p: Tensor, k: Tensor, sigma: Tensor) -> Tensor:
    """Quantiles at ``p`` (M,) of GPDs with rows' shapes and scales ``k``, ``sigma`` (N,)."""
    k, sigma = k[:, None], sigma[:, None]
    log_tail = torch.log1p(-p)
    small = k.abs() < 1e-10  # the exponential limit k -> 0, where expm1(...)/k is 0/0
    safe_k = torch.where(small, torch.ones_like(k), k)
    return torch.where(small, -sigma * log_tail, sigma * torch.expm1(-k * log_tail) / safe_k)


def psis(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Pareto-smoothed log-weights (same shape and scale as ``log_w``) and k̂ per row.

    ``log_w`` is (N, S) or (S,). Rows whose tail weights are all equal (nothing to fit) get
    k̂ = -inf and keep their weights; with S <= 20 (tail shorter than 5) every row gets
    k̂ = +inf, i.e. "cannot be checked, do not trust", and keeps its weights.
    """
    one_d = log_w.dim() == 1
    log_w = log_w.double().reshape(-1, log_w.shape[-1])
    n_rows, s = log_w.shape
    m = tail_length(s)
    if m < MIN_TAIL:
        khat = torch.full((n_rows,), math.inf, dtype=log_w.dtype, device=log_w.device)
        return (log_w[0], khat[0]) if one_d else (log_w, khat)

    # Scaling by the row max keeps every weight in [0, 1]; the clamp keeps an all -inf row finite.
    shift = log_w.amax(-1, keepdim=True).clamp_min(torch.finfo(log_w.dtype).min)
    w = torch.exp(log_w - shift)
    top, idx = torch.topk(w, m + 1, dim=-1, sorted=True)
    threshold, tail, tail_idx = top[:, m:], top[:, :m].flip(-1), idx[:, :m].flip(-1)
    x = tail - threshold  # ascending exceedances
    flat = x[:, -1] <= 0

    # Flat rows are fitted on dummy exceedances so that no NaN appears, then overwritten.
    k, sigma = _gpd_fit(torch.where(flat[:, None], torch.ones_like(x), x))
    k = torch.where(flat, torch.full_like(k, -math.inf), k)

    p = (torch.arange(1, m + 1, dtype=w.dtype, device=w.device) - 0.5) / m
    smooth = (threshold + _gpd_quantile(p, k, sigma)).clamp_max(1.0)  # 1.0 = the row's max weight
    smooth = torch.where(flat[:, None] | ~torch.isfinite(smooth), tail, smooth)
    smoothed = torch.log(w.scatter(-1, tail_idx, smooth)) + shift
    return (smoothed[0], k[0]) if one_d else (smoothed, k)


def pareto_khat(log_w: Tensor) -> Tensor:
    """PSIS k̂ per row of ``log_w`` (shape (N, S) -> (N,)); see :func:`psis`."""
    return psis(log_w)[1]


def summary(khat: Tensor, ess: Tensor, num_samples: int | None = None) -> dict[str, float]:
    """Plain-float summary over images of k̂ (N,) and ESS (N,):

    * ``khat_over_0_5``: share of images with k̂ > 0.5 (infinite-variance weights);
    * ``khat_over_0_7``: share with k̂ > 0.7 (estimate unreliable);
    * ``khat_max``: the largest k̂ (-inf if every tail is flat, +inf if S <= 20);
    * ``ess_median``: median ESS;
    * ``ess_fraction_median``: median ESS / S, only when ``num_samples`` (S) is given.
    """
    khat, ess = khat.double().flatten(), ess.double().flatten()
    out = {
        "khat_over_0_5": (khat > 0.5).double().mean().item(),
        "khat_over_0_7": (khat > 0.7).double().mean().item(),
        "khat_max": khat.max().item(),
        "ess_median": torch.quantile(ess, 0.5).item(),
    }
    if num_samples is not None:
        out["ess_fraction_median"] = out["ess_median"] / num_samples
    return out
