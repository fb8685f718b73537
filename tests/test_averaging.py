"""The weight average (train.ema) against its recurrence, and the KL warm-up objective
(train.anneal = kl) against the ELBO it must end at."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowvae.averaging import WeightAverage
from flowvae.experiments.vae import ANNEALED, FlowVAE, negative_elbo


def test_average_follows_its_recurrence():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    average = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        average.update(step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, model.parameters())]
    for got, want in zip(average.shadow, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_swapped_in_shows_the_average_and_restores_the_weights_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(100)
    raw = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError), average.swapped_in():
        for p, s in zip(model.parameters(), average.shadow, strict=True):
            assert torch.equal(p, s)
        inside = model(x)
        raise RuntimeError("the weights come back on every exit")
    for p, r in zip(model.parameters(), raw, strict=True):
        assert torch.equal(p, r)
    assert not torch.allclose(inside, model(x))
    state = average.state_dict(model)
    for (name, p), s in zip(model.named_parameters(), average.shadow, strict=True):
        assert torch.equal(state[name], s) and not torch.equal(state[name], p)


@pytest.fixture
def vae_terms():
    torch.manual_seed(2)
    model = FlowVAE(x_dim=20, latent_dim=3, hidden=[16], flow_name="planar", k=4).double()
    x = torch.bernoulli(torch.full((6, 20), 0.3, dtype=torch.float64))
    return model, x


def test_both_annealings_end_at_the_negative_elbo(vae_terms):
    model, x = vae_terms
    torch.manual_seed(3)
    bound = negative_elbo(model, x)
    for objective in ANNEALED.values():
        torch.manual_seed(3)  # the same base noise as the bound drew
        torch.testing.assert_close(objective(model(x), 1.0), bound)
        torch.manual_seed(3)
        assert not torch.allclose(objective(model(x), 0.5), bound)


def test_kl_warmup_trains_the_decoder_at_full_strength(vae_terms):
    """At β = 0.01 the decoder's gradient is that of the reconstruction term alone (it does not
    enter log q or log p(z)); the paper's annealing scales it by β."""
    model, x = vae_terms
    eps = torch.randn(6, 3, dtype=torch.float64)
    decoder = [*model.decoder_body.parameters(), *model.decoder_out.parameters()]

    def decoder_grad(loss_of):
        grads = torch.autograd.grad(loss_of(model(x, eps)).sum(), decoder)
        return torch.cat([g.flatten() for g in grads])

    recon = decoder_grad(lambda t: -t["log_px"])
    torch.testing.assert_close(decoder_grad(lambda t: ANNEALED["kl"](t, 0.01)), recon)
    torch.testing.assert_close(decoder_grad(lambda t: ANNEALED["joint"](t, 0.01)), 0.01 * recon)
