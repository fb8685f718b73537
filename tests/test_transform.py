"""Flow stacks as torch.distributions transforms: TransformedDistribution's log_prob equals
flowvae's own log q for every registered family, global and amortised, and gradients reach the
flow's parameters through rsample and log_prob."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

from flowvae import flows
from flowvae.experiments.base import gaussian_log_prob
from flowvae.experiments.density import FlowDensity

D, K, B = 4, 3, 64
#: |log_prob via torch - flowvae's log q| in float64 at points torch must invert. The families
#: with a numerical inverse (planar, the Sylvester ones: safeguarded Newton to convergence) are
#: held to the same bound as the analytic ones; both measured at ~4e-15 here.
TOL = {True: 1e-6, False: 1e-6}
NAMES = flows.available()


def standard_normal(dim: int) -> Independent:
    zeros = torch.zeros(dim, dtype=torch.float64)
    return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def built(name: str, amortized: bool) -> tuple[flows.FlowStack, torch.Tensor | None]:
    torch.manual_seed(0)
    stack = flows.build(name, D, K, amortized=amortized).double()
    if not amortized:
        return stack, None
    params = 0.5 * torch.randn(B, stack.num_params, dtype=torch.float64)
    return stack, params.requires_grad_()


@pytest.mark.parametrize("amortized", [False, True], ids=["global", "amortised"])
@pytest.mark.parametrize("name", NAMES)
def test_log_prob_equals_flowvae_log_q(name, amortized):
    stack, params = built(name, amortized)
    q = TransformedDistribution(standard_normal(D), stack.as_transform(params))
    z0 = torch.randn(B, D, dtype=torch.float64)
    z_k, log_det = stack(z0, params)
    own = gaussian_log_prob(z0) - log_det  # what the VAE and the density fit score
    # A point torch has to invert (a copy: no cached pair to reuse).
    fresh = q.log_prob(z_k.detach().clone())
    tol = TOL[stack.layers[0].exact_inverse]
    assert torch.allclose(fresh, own, atol=tol, rtol=0), float((fresh - own).abs().max())
    if not amortized:  # and the density experiment's log q_K(z) at arbitrary points
        density = FlowDensity(stack, dim=D, base="standard").double()
        assert torch.allclose(fresh, density.log_prob(z_k.detach()), atol=tol, rtol=0)


@pytest.mark.parametrize("amortized", [False, True], ids=["global", "amortised"])
@pytest.mark.parametrize("name", NAMES)
def test_rsample_then_log_prob_is_exact_and_differentiable(name, amortized):
    stack, params = built(name, amortized)
    t = stack.as_transform(params)
    q = TransformedDistribution(standard_normal(D), t)
    z = q.rsample((B,))
    log_q = q.log_prob(z)
    # the cached pair: the base draw and the log-det of the very pass that made z
    x, y, log_det = t._last
    assert y is z
    assert torch.equal(log_q, standard_normal(D).log_prob(x) - log_det)
    assert torch.equal(stack(x, params)[0], z)
    (log_q + z.pow(2).sum(-1)).sum().backward()
    grads = [params.grad] if amortized else [p.grad for p in stack.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", NAMES)
def test_sample_axes_and_gradient_through_an_inverted_point(name):
    stack, _ = built(name, amortized=False)
    q = TransformedDistribution(standard_normal(D), stack.as_transform())
    z = q.sample((2, 5))
    assert z.shape == (2, 5, D)
    log_q = q.log_prob(z.clone())
    assert log_q.shape == (2, 5) and torch.isfinite(log_q).all()
    log_q.sum().backward()  # maximum likelihood through the inverse works too
    assert all(torch.isfinite(p.grad).all() for p in stack.parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


def test_sign_and_shape_checks():
    assert flows.build("nice", D, 2).as_transform().sign == 1
    with pytest.raises(NotImplementedError):
        _ = flows.build("householder", D, 2).as_transform().sign  # a reflection
    amortised = flows.build("planar", D, 2, amortized=True)
    with pytest.raises(ValueError, match="parameters of shape"):
        amortised.as_transform(None)
    shared = torch.zeros(1, amortised.num_params)  # one row of parameters for every sample
    q = TransformedDistribution(
        Independent(Normal(torch.zeros(D), 1.0), 1), amortised.as_transform(shared)
    )
    assert q.rsample((7,)).shape == (7, D)
