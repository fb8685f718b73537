"""ESS and PSIS k̂ against their definitions and against weights whose tail index is known.

For weights with a Pareto-type tail P(w > t) ~ t^(-1/k), the exceedances over a high threshold
are (asymptotically) generalised Pareto with shape k, so k̂ must recover k.
"""

import math

import numpy as np
import pytest
import torch

from flowvae.psis import ess, pareto_khat, psis, summary, tail_length

S = 5000
ROWS = 32  # one row's k̂ has a standard deviation of ~0.1 at S = 5000; a median of 32, ~0.02


def _exp1(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(rows, S, dtype=torch.float64).exponential_(generator=g)


def _reference_khat(w: np.ndarray) -> float:
    """A plain transcription of ArviZ's ``_gpdfit`` (Zhang & Stephens, with the prior towards
    0.5) on one row of weights, one grid point at a time."""
    m_tail = tail_length(len(w))
    w = np.sort(w)
    x = w[-m_tail:] - w[-m_tail - 1]
    n = len(x)
    m = 30 + int(n**0.5)
    b = [
        1 / x[-1] + (1 - math.sqrt(m / (j - 0.5))) / (3 * x[int(n / 4 + 0.5) - 1])
        for j in range(1, m + 1)
    ]
    ks = [np.mean(np.log1p(-bj * x)) for bj in b]
    lik = [n * (math.log(-bj / kj) - kj - 1) for bj, kj in zip(b, ks)]
    post = [1 / sum(math.exp(lj - li) for lj in lik) for li in lik]
    b_hat = sum(bj * pj for bj, pj in zip(b, post)) / sum(post)
    k = np.mean(np.log1p(-b_hat * x))
    return (n * k + 10 * 0.5) / (n + 10)


def test_ess_matches_definition():
    log_w = 2 * torch.randn(5, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = np.exp(log_w.numpy())
    expected = w.sum(1) ** 2 / (w**2).sum(1)
    np.testing.assert_allclose(ess(log_w).numpy(), expected, rtol=1e-12)
    assert ess(log_w[2]).shape == ()
    np.testing.assert_allclose(ess(log_w[2]).item(), expected[2], rtol=1e-12)


def test_ess_extremes_and_shift_invariance():
    assert ess(torch.zeros(3, 100)).tolist() == pytest.approx([100.0] * 3, rel=1e-12)
    dominant = torch.full((100,), -1000.0)
    dominant[17] = 0.0
    assert ess(dominant).item() == pytest.approx(1.0, abs=1e-12)
    # Log-weights of real models sit far from 0 (e.g. -log p(x) ~ 100 nats): no overflow.
    log_w = torch.randn(4, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.tensor([[-800.0], [0.0], [3.0], [900.0]], dtype=torch.float64)
    torch.testing.assert_close(ess(log_w + shift), ess(log_w), rtol=1e-10, atol=0)


def test_khat_matches_reference_transcription():
    log_w = 1.5 * torch.randn(
        3, 1000, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    for row, k in zip(log_w, pareto_khat(log_w).tolist()):
        w = np.exp(row.numpy() - row.max().item())
        assert k == pytest.approx(_reference_khat(w), abs=1e-10)


# Known tails, and the k each one must give:
# * Pareto: w = U^(-xi) = exp(xi·E), E ~ Exp(1), has P(w > t) = t^(-1/xi): k = xi;
# * exponential: w = E, exceedances over any threshold are again Exp: k = 0 exactly;
# * uniform: w = U, exceedances over u are uniform on (0, 1 - u), the GPD with k = -1.
# The prior towards 0.5 moves each by 10/(M + 10) ~ 4.5% of the way (M = 213 at S = 5000).
# Each entry maps E ~ Exp(1) to log w (exp(-E) ~ U(0, 1)).
KNOWN_TAILS = {
    "pareto_0.2": (lambda e: 0.2 * e, 0.2),
    "pareto_0.5": (lambda e: 0.5 * e, 0.5),
    "pareto_0.8": (lambda e: 0.8 * e, 0.8),
    "pareto_1.0": (lambda e: e, 1.0),
    "exponential": (lambda e: torch.log(e), 0.0),
    "uniform": (lambda e: -e, -1.0),
}


@pytest.mark.parametrize("name", list(KNOWN_TAILS))
def test_khat_recovers_known_tail_index(name):
    make, k_true = KNOWN_TAILS[name]
    khat = pareto_khat(make(_exp1(ROWS, seed=10)))
    assert khat.median().item() == pytest.approx(k_true, abs=0.1)


@pytest.mark.parametrize("sigma", [0.7, 0.8])
def test_khat_gaussian_proposal_too_narrow(sigma):
    # Target p = N(0, 1), proposal q = N(0, sigma^2), sigma < 1. With z = sigma·eps under q,
    # log w = log p(z) - log q(z) = eps^2·(1 - sigma^2)/2 + const, so
    # P(w > t) = P(|eps| > sqrt(2 log t / (1 - sigma^2))) ~ t^(-1/(1 - sigma^2)) / sqrt(log t):
    # a Pareto tail (up to a slowly varying factor) with k = 1 - sigma^2.
    # The 1/sqrt(log t) factor makes finite-S tails look lighter: over 20 seeds the median k̂ is
    # 0.03 low at sigma = 0.7 but 0.07 low at sigma = 0.5 (k = 0.75), too close to 0.1 to test.
    g = torch.Generator().manual_seed(20)
    z = sigma * torch.randn(ROWS, S, generator=g, dtype=torch.float64)
    log_w = -0.5 * z**2 - (-0.5 * (z / sigma) ** 2 - math.log(sigma))
    khat = pareto_khat(log_w)
    assert khat.median().item() == pytest.approx(1 - sigma**2, abs=0.1)


def test_smoothing_caps_and_keeps_order():
    log_w = 0.8 * _exp1(ROWS, seed=30) - 300.0  # Pareto k = 0.8, far from log-scale 0
    smoothed, khat = psis(log_w)
    assert smoothed.shape == log_w.shape and torch.isfinite(smoothed).all()
    row_max = log_w.max(-1, keepdim=True).values
    assert (smoothed <= row_max).all()
    order = log_w.argsort(-1)
    assert (smoothed.gather(-1, order).diff(dim=-1) >= 0).all()
    # Only the M largest weights move.
    m = tail_length(S)
    body = log_w < log_w.topk(m, -1).values[:, -1:]
    assert torch.equal(smoothed[body], log_w[body])
    assert (smoothed[~body] != log_w[~body]).any()


def test_rows_at_once_equal_rows_one_by_one():
    log_w = 3 * torch.randn(
        6, 997, generator=torch.Generator().manual_seed(40), dtype=torch.float64
    )
    smoothed, khat = psis(log_w)
    for i, row in enumerate(log_w):
        smoothed_i, khat_i = psis(row)
        assert khat_i.shape == () and smoothed_i.shape == row.shape
        torch.testing.assert_close(khat_i, khat[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(smoothed_i, smoothed[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ess(row), ess(log_w)[i], rtol=1e-12, atol=0)


def test_degenerate_rows_and_summary():
    log_w = torch.randn(4, 100, generator=torch.Generator().manual_seed(50), dtype=torch.float64)
    log_w[1] = -5.0  # all weights equal: flat tail
    log_w[2] = -math.inf  # every sample rejected
    smoothed, khat = psis(log_w)
    assert khat[1].item() == -math.inf and khat[2].item() == -math.inf
    assert torch.equal(smoothed[1], log_w[1]) and torch.equal(smoothed[2], log_w[2])
    assert torch.isfinite(khat[[0, 3]]).all()

    # Too few samples to fit a tail: flagged as untrustworthy, weights untouched.
    small_smoothed, small_khat = psis(log_w[:, :20])
    assert (small_khat == math.inf).all() and torch.equal(small_smoothed, log_w[:, :20])

    keep = [0, 1, 3]
    out = summary(khat[keep], ess(log_w[keep]), num_samples=100)
    assert all(isinstance(v, float) and not math.isnan(v) for v in out.values())
    assert out["khat_max"] == khat[[0, 3]].max().item()
    assert out["ess_median"] == pytest.approx(ess(log_w[[0, 1, 3]]).median().item())
    assert out["ess_fraction_median"] == pytest.approx(out["ess_median"] / 100)

    k = torch.tensor([0.1, 0.6, 0.8, -math.inf], dtype=torch.float64)
    out = summary(k, torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert out == {"khat_over_0_5": 0.5, "khat_over_0_7": 0.25, "khat_max": 0.8, "ess_median": 25.0}


def test_smoothing_a_light_tail_leaves_the_estimate_alone():
    """Where k̂ is small, the Pareto-smoothed mean weight equals the plain one to a few 1e-3
    (log scale); it is the heavy tails that smoothing moves."""
    gen = torch.Generator().manual_seed(3)
    log_w = 0.5 * torch.randn(16, 2000, generator=gen, dtype=torch.float64) - 40.0
    smoothed, khat = psis(log_w)
    assert (khat < 0.3).all(), khat
    plain = torch.logsumexp(log_w, dim=1)
    torch.testing.assert_close(torch.logsumexp(smoothed, dim=1), plain, atol=5e-3, rtol=0)
