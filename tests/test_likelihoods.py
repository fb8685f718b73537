"""The likelihood registry against exact answers.

The logit-normal is checked against its formula, for being a density over x (it integrates to
one), and on a linear-Gaussian model in logit space whose log-likelihood is known in closed form:
z ~ N(0, I), y = A z + b + σ ε, x = sigmoid(y), so log p(x) = log N(logit x; b, AAᵀ + diag σ²)
− Σ log(x(1 − x)). A VAE whose decoder holds the true A, b, σ must reproduce it: exactly by
quadrature over z, and within a few standard errors by importance sampling — in nats and in
bits/dim. The Bernoulli path must stay the arithmetic it was.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowvae.data.pixels import BinaryPixels, ContinuousPixels
from flowvae.experiments.vae import FlowVAE, free_energy
from flowvae.importance import importance_nll
from flowvae.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    LogitNormal,
    bernoulli_log_lik,
    bits_per_dim,
    bits_per_dim_8bit,
    logit_normal_log_lik,
)
from flowvae.registry import UnknownNameError

D, L = 8, 2  # pixels and latents of the linear-Gaussian model


def test_registry_holds_both_likelihoods():
    assert LIKELIHOODS.names() == ["bernoulli", "logit_normal"]
    assert LIKELIHOODS.get("bernoulli") is Bernoulli
    assert (Bernoulli.pixels, Bernoulli.outputs) == ("binary", 1)
    assert (LogitNormal.pixels, LogitNormal.outputs) == ("continuous", 2)
    with pytest.raises(UnknownNameError, match="did you mean 'logit_normal'"):
        LIKELIHOODS.get("logit_normall")


def test_bernoulli_path_is_the_arithmetic_it_was():
    """Same bits as before the registry: -BCE-with-logits summed, grouped rows by softplus."""
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(12, 5, generator=gen)
    x = torch.bernoulli(torch.full((12, 5), 0.4), generator=gen)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert torch.equal(Bernoulli().log_prob(logits, x), expected)
    grouped = logits.view(4, 3, 5)
    x4 = x[::3].unsqueeze(1)  # 4 images, 3 importance samples each
    expected = ((grouped * x4).sum(-1) - F.softplus(grouped).sum(-1)).reshape(-1)
    assert torch.equal(bernoulli_log_lik(logits, x4), expected)
    torch.manual_seed(3)
    model = FlowVAE(x_dim=5, latent_dim=2, hidden=[4], flow_name="planar", k=1)
    assert isinstance(model.likelihood, Bernoulli)
    assert model.decoder_out.weight.shape == (5, 4)  # one logit per pixel, as before


def _params(gen, rows, d):
    mu = 2 * torch.randn(rows, d, generator=gen, dtype=torch.float64)
    log_sigma = torch.empty(rows, d, dtype=torch.float64).uniform_(-2, 1, generator=gen)
    return mu, log_sigma


def test_logit_normal_is_the_formula():
    gen = torch.Generator().manual_seed(1)
    mu, log_sigma = _params(gen, 12, 6)
    x = torch.rand(12, 6, generator=gen, dtype=torch.float64) * 0.998 + 0.001
    normal = torch.distributions.Normal(mu, log_sigma.exp())
    expected = (normal.log_prob(torch.logit(x)) - torch.log(x) - torch.log1p(-x)).sum(-1)
    out = torch.cat([mu, log_sigma], dim=-1)
    got = logit_normal_log_lik(out, x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    # grouped: 4 images against 3 rows of parameters each
    x4 = x[::3].unsqueeze(1)
    expected = (
        (normal.log_prob(torch.logit(x4.expand(4, 3, 6).reshape(12, 6))))
        - torch.log(x4.expand(4, 3, 6).reshape(12, 6))
        - torch.log1p(-x4.expand(4, 3, 6).reshape(12, 6))
    ).sum(-1)
    assert torch.allclose(LogitNormal().log_prob(out, x4), expected, rtol=0, atol=1e-12)
    assert torch.allclose(LogitNormal().picture(out), torch.sigmoid(mu), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("mu", "log_sigma"), [(0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)])
def test_logit_normal_integrates_to_one_over_x(mu, log_sigma):
    """The change-of-variables term makes exp(log p) a density over x ∈ (0, 1)."""
    t = torch.linspace(-30, 30, 300001, dtype=torch.float64)  # x = sigmoid(t), dx = x(1-x) dt
    x = torch.sigmoid(t)
    out = torch.tensor([[mu, log_sigma]], dtype=torch.float64).expand(t.numel(), 2)
    density = logit_normal_log_lik(out, x[:, None]).exp()
    integral = torch.trapezoid(density * x * (1 - x), t)
    assert abs(float(integral) - 1) < 1e-9


# --------------------------------------------------------------------------- closed form


def _linear_gaussian(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = 0.8 * torch.randn(D, L, generator=gen, dtype=torch.float64)
    b = 0.5 * torch.randn(D, generator=gen, dtype=torch.float64)
    log_s = torch.empty(D, dtype=torch.float64).uniform_(-1.2, -0.5, generator=gen)

    def draw(n: int) -> torch.Tensor:
        z = torch.randn(n, L, generator=gen, dtype=torch.float64)
        y = z @ a.T + b + log_s.exp() * torch.randn(n, D, generator=gen, dtype=torch.float64)
        return torch.sigmoid(y)

    def log_px(x: torch.Tensor) -> torch.Tensor:
        cov = a @ a.T + torch.diag((2 * log_s).exp())
        marginal = torch.distributions.MultivariateNormal(b, covariance_matrix=cov)
        return marginal.log_prob(torch.logit(x)) - (torch.log(x) + torch.log1p(-x)).sum(-1)

    return a, b, log_s, draw, log_px


class Logit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x)


@pytest.fixture(scope="module")
def true_model():
    """A logit-normal flow VAE whose decoder is the true model (no hidden layer: μ = A z + b,
    log σ = the true log-scales), and its encoder fitted briefly so q is a sensible proposal
    (reading logit(x), where the true posterior's mean is linear)."""
    a, b, log_s, draw, log_px = _linear_gaussian()
    torch.manual_seed(0)
    model = FlowVAE(
        x_dim=D,
        latent_dim=L,
        hidden=[],
        flow_name="planar",
        k=2,
        activation="tanh",
        likelihood="logit_normal",
    ).double()
    model.encoder = Logit()
    with torch.no_grad():
        model.decoder_out.weight.zero_()
        model.decoder_out.weight[:D] = a
        model.decoder_out.bias[:D] = b
        model.decoder_out.bias[D:] = log_s
    encoder = [p for name, p in model.named_parameters() if not name.startswith("decoder")]
    opt = torch.optim.Adam(encoder, lr=1e-2)
    x_train = draw(4000)
    for _ in range(500):
        idx = torch.randint(0, x_train.shape[0], (256,))
        loss = free_energy(model(x_train[idx]), 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), draw, log_px


def test_decoder_likelihood_integrates_to_the_closed_form(true_model):
    """log ∫ p(x|z) N(z; 0, I) dz by quadrature on a grid of z (2-D) equals the closed form."""
    model, draw, log_px = true_model
    x = draw(6)
    side = torch.linspace(-8, 8, 321, dtype=torch.float64)
    h = float(side[1] - side[0])
    z = torch.cartesian_prod(side, side)
    log_prior = -0.5 * (z * z).sum(-1) - L / 2 * math.log(2 * math.pi)
    with torch.no_grad():
        out = model.decode(z)  # (G, 2D)
        log_lik = torch.stack(
            [model.likelihood.log_prob(out, xi.expand_as(out[:, :D])) for xi in x]
        )
    quadrature = torch.logsumexp(log_lik + log_prior, dim=1) + 2 * math.log(h)
    assert torch.allclose(quadrature, log_px(x), rtol=0, atol=1e-6), (quadrature, log_px(x))


def test_importance_sampled_nll_lands_on_the_truth(true_model):
    """S = 1000 importance samples per image on 400 fresh images: the mean -log p(x) is within
    3 standard errors of the closed-form mean, in nats and in bits/dim; paired per image, the
    upward bias of the log of an average stays below 0.01 nats."""
    model, draw, log_px = true_model
    x = draw(400)
    truth = -log_px(x)
    with torch.inference_mode():
        est = importance_nll(model, x, samples=1000, generator=torch.Generator().manual_seed(1))
    n = x.shape[0]
    nll, stderr = float(est.nll.mean()), float(est.nll.std()) / math.sqrt(n)
    true_mean = float(truth.mean())
    diff = est.nll - truth
    paired = float(diff.std()) / math.sqrt(n)
    report = (
        f"closed form {true_mean:.4f} nats ({bits_per_dim(true_mean, D):.5f} bits/dim); "
        f"estimate {nll:.4f} ± {stderr:.4f} nats ({bits_per_dim(nll, D):.5f} ± "
        f"{bits_per_dim(stderr, D):.5f} bits/dim); paired difference {float(diff.mean()):.4f} "
        f"± {paired:.4f} nats"
    )
    print(report)
    assert abs(nll - true_mean) < 3 * stderr, report
    assert abs(bits_per_dim(nll, D) - bits_per_dim(true_mean, D)) < 3 * bits_per_dim(stderr, D)
    assert -3 * paired < float(diff.mean()) < 3 * paired + 0.01, (float(diff.mean()), paired)
    assert float(est.neg_elbo.mean()) > true_mean  # the ELBO bounds log p(x) from below


# --------------------------------------------------------------------------- bits/dim


def test_bits_per_dim_conversions():
    assert bits_per_dim(192 * math.log(2), 192) == pytest.approx(1.0)
    # x uniform on (ε, 1 − ε)^D (8-bit values uniform on 0..255, dequantised): exactly 8 bits.
    eps = 1e-3
    nll = 192 * math.log(1 - 2 * eps)
    assert bits_per_dim_8bit(nll, 192, eps) == pytest.approx(8.0, abs=1e-12)
    # the paper's Table 3, K = 10: -320.7 nats over (0, 1)^192 -> bits/dim in both spaces
    assert bits_per_dim(-320.7, 192) == pytest.approx(-2.409752, abs=1e-6)
    assert bits_per_dim_8bit(-320.7, 192, eps) == pytest.approx(8 - 2.409752 + 0.002888, abs=1e-6)
    eight_bit = ContinuousPixels(levels=256, eps=eps).metrics(-320.7, 1.0, 192)
    assert set(eight_bit) == {"bits_per_dim", "bits_per_dim_stderr", "bits_per_dim_8bit"}
    assert set(ContinuousPixels(levels=None).metrics(-5.0, 0.1, 8)) == {
        "bits_per_dim",
        "bits_per_dim_stderr",
    }
    assert BinaryPixels(levels=256).metrics(90.0, 0.2, 784) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_pixels_are_torch_bernoulli_to_the_bit(dtype):
    """The draw is torch.bernoulli's on the CPU: the same pixels and the same RNG state after,
    from the global RNG and from a generator (a resumed run depends on both)."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (300, 784), generator=gen).to(dtype)
    k[0, :3] = torch.tensor([0.0, 255.0, 128.0], dtype=dtype)  # p = 0 and p = 1 included
    pixels = BinaryPixels(levels=256)
    for seed in range(3):
        torch.manual_seed(seed)
        got, after = pixels.draw(k.clone()), torch.rand(4, dtype=dtype)
        torch.manual_seed(seed)
        want, want_after = torch.bernoulli(k / 255.0), torch.rand(4, dtype=dtype)
        assert torch.equal(got, want) and torch.equal(after, want_after)
        assert got[0, 0] == 0 and got[0, 1] == 1 and 0.4 < float(got.mean()) < 0.6
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(pixels.draw(k.clone(), g1), torch.bernoulli(k / 255.0, generator=g2))
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_continuous_pixels_dequantise_into_the_open_interval():
    k = torch.tensor([[0.0, 255.0, 128.0]]).repeat(1000, 1)
    x = ContinuousPixels(levels=256, eps=1e-3).draw(k.clone(), torch.Generator().manual_seed(0))
    assert x.min() > 1e-3 and x.max() < 1 - 1e-3
    back = torch.floor((x - 1e-3) / (1 - 2e-3) * 256)  # each value stays in its own bin
    assert torch.equal(back, k)
    v = torch.tensor([[0.0, 0.5, 1.0]])
    squeezed = ContinuousPixels(levels=None, eps=0.01).draw(v.clone())
    assert torch.allclose(squeezed, torch.tensor([[0.01, 0.5, 0.99]]))
    with pytest.raises(Exception, match="data.eps"):
        ContinuousPixels(levels=256, eps=0.5)


# --------------------------------------------------------------------------- end to end


def test_continuous_npz_through_the_cli(tmp_path, cli_in_process):
    """The linear-Gaussian data as a user's .npz (floats in [0, 1]), a tiny VAE trained for a few
    seconds through the CLI: its test -log p(x) lies above the truth (less a few s.e.) and close
    to it, and bits/dim is -log p(x) / (D ln 2)."""
    _, _, _, draw, log_px = _linear_gaussian(seed=5)
    train, test = draw(5000).float(), draw(1000).float()
    np.savez(tmp_path / "lg.npz", train=train[:, None, :].numpy(), test=test[:, None, :].numpy())
    eps = 1e-3
    # the file's floats are squeezed into (ε, 1 − ε): the density there is p(x) / (1 − 2ε)^D
    truth = float((-log_px(test.double())).mean()) + D * math.log(1 - 2 * eps)
    sets = ["data.name=npz", f"data.root={tmp_path / 'lg.npz'}", "model.likelihood=logit_normal"]
    sets += ["model.hidden=[64]", "model.activation=tanh", "model.latent_dim=2", "flow.k=2"]
    sets += ["train.steps=1000", "train.anneal_steps=250", "train.batch_size=200"]
    sets += ["train.eval_every=1000", "train.log_every=500", "device=cpu"]
    args = [a for s in sets for a in ("--set", s)]
    run = tmp_path / "run"
    proc = cli_in_process("train", "--config", "mnist_quick", *args, "--no-progress", "--out", run)
    assert proc.returncode == 0, proc.stderr
    proc = cli_in_process("eval", run / "checkpoints" / "best.pt", "--json", "--iw-samples", "500")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (r["dataset"], r["likelihood"], r["examples"]) == ("npz", "logit_normal", 1000)
    assert "bits_per_dim_8bit" not in r  # floats: no 8-bit space to convert to
    assert r["bits_per_dim"] == pytest.approx(r["nll"] / (D * math.log(2)))
    print(f"truth {truth:.4f}, trained {r['nll']:.4f} ± {r['nll_stderr']:.4f} nats")
    assert truth - 3 * r["nll_stderr"] < r["nll"] < truth + 0.5
