"""The two annealed objectives (train.anneal): both end at the negative ELBO, and the KL warm-up
trains the decoder at full strength while the paper's schedule scales it by β."""

from __future__ import annotations

import pytest
import torch

from flowvae.experiments.vae import ANNEALED, FlowVAE, negative_elbo


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
