"""The importance-sampled -log p(x) against an exact answer from quadrature.

A tiny flow VAE (latent dimension 1, 4 binary pixels) has log p(x) = log ∫ p(x|z) p(z) dz, a
1-D integral that a fine grid computes to ~1e-10. The same holds for the ELBO, an expectation
over the 1-D base density q0. The estimator must agree with both.
"""

import math

import pytest
import torch

from flowvae.experiments.vae import FlowVAE, free_energy
from flowvae.importance import importance_nll
from flowvae.likelihoods import bernoulli_log_lik

pytestmark = pytest.mark.filterwarnings("ignore")


def _fitted(steps: int, amortized: bool = True):
    """The tiny model fitted for ``steps`` Adam updates, as a real run would be: the decoder
    then depends on z (the posterior is not the prior) and q(z|x) is a sensible proposal."""
    torch.manual_seed(0)
    model = FlowVAE(
        x_dim=4,
        latent_dim=1,
        hidden=[8],
        flow_name="planar",
        k=2,
        activation="tanh",
        amortized=amortized,
    )
    model = model.double()
    x = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = free_energy(model(x.repeat(16, 1)), 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x


@pytest.fixture(scope="module")
def model_and_data():
    return _fitted(400)


@pytest.fixture(scope="module")
def loose_model_and_data():
    """Fitted less, so the ELBO gap (~0.07 nats) stands well above the Monte Carlo noise."""
    return _fitted(60)


def _grid(lo=-12.0, hi=12.0, n=200001):
    z = torch.linspace(lo, hi, n, dtype=torch.float64)
    return z, (hi - lo) / (n - 1)


def exact_log_px(model, x):
    """log ∫ p(x|z) N(z; 0, 1) dz on a grid (trapezoid; the integrand is negligible at ±12)."""
    z, h = _grid()
    with torch.no_grad():
        log_px_z = bernoulli_log_lik(
            model.decode(z[:, None]).unsqueeze(0).expand(x.shape[0], -1, -1).reshape(-1, 4),
            x.repeat_interleave(z.numel(), 0),
        ).view(x.shape[0], -1)
    log_prior = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(log_px_z + log_prior, dim=1) + math.log(h)


def exact_neg_elbo(model, x):
    """E_{z0 ~ q0(.|x)}[log q_K(z_K) - log p(x, z_K)] on a grid of z0 (1-D)."""
    z0, h = _grid(-10, 10, 40001)
    out = []
    with torch.no_grad():
        mu, sigma, params = model.encode(x)
        for i in range(x.shape[0]):
            eps = z0[:, None]
            n = eps.shape[0]
            terms = model.log_weights(
                x[i].expand(n, -1),
                mu[i].expand(n, -1),
                sigma[i].expand(n, -1),
                params[i].expand(n, -1),
                eps,
            )
            weight = torch.exp(-0.5 * z0**2) / math.sqrt(2 * math.pi) * h
            out.append(float((weight * (terms["log_q"] - terms["log_px"] - terms["log_pz"])).sum()))
    return torch.tensor(out)


@pytest.fixture(scope="module")
def global_model_and_data():
    """Flow parameters learned once for all data points (flow.amortized: false)."""
    return _fitted(400, amortized=False)


@pytest.mark.parametrize("fitted", ["model_and_data", "global_model_and_data"])
def test_estimate_with_5000_samples_matches_quadrature(fitted, request):
    model, x = request.getfixturevalue(fitted)
    exact = -exact_log_px(model, x)
    torch.manual_seed(1)
    with torch.inference_mode():
        nll = importance_nll(model, x, samples=5000, max_rows=3000).nll
    assert (nll - exact).abs().max() < 0.01, (nll, exact)


def test_one_image_at_a_time_matches_quadrature(model_and_data):
    """With one image per call its flow parameters are shared by the samples, not repeated."""
    model, x = model_and_data
    exact = -exact_log_px(model, x)
    torch.manual_seed(1)
    with torch.inference_mode():
        nll = torch.cat([importance_nll(model, row[None], samples=5000).nll for row in x])
    assert (nll - exact).abs().max() < 0.01, (nll, exact)


def test_more_samples_tighten_the_bound_and_one_sample_is_the_elbo(loose_model_and_data):
    model, x = loose_model_and_data
    exact_nll = -exact_log_px(model, x)
    exact_nelbo = exact_neg_elbo(model, x)
    assert torch.all(exact_nelbo >= exact_nll - 1e-9)  # the ELBO is a lower bound on log p(x)
    torch.manual_seed(2)
    reps = 400
    means = {}
    with torch.inference_mode():
        for s in (1, 10, 1000):
            batch = x.repeat(reps, 1)
            nll = importance_nll(model, batch, samples=s).nll
            means[s] = nll.view(reps, -1).mean(0)
    # E[nll(S)] decreases with S towards the exact value, from the -ELBO at S = 1.
    assert torch.all(means[1] > means[10]) and torch.all(means[10] > means[1000])
    assert torch.all(means[1000] >= exact_nll - 0.01)
    assert (means[1] - exact_nelbo).abs().max() < 0.05, (means[1], exact_nelbo)
    assert (means[1000] - exact_nll).abs().max() < 0.01
