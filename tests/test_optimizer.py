"""The optimiser's parameter groups: the encoder's flow head can take a smaller step."""

from __future__ import annotations

import pytest
import torch

from flowvae.config import load_config
from flowvae.experiments.vae import FlowVAE, flow_head_groups, negative_elbo
from flowvae.train import make_optimizer


def first_adam_step(scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """|Δθ| of the flow head and of the rest after one Adam update, and the lr."""
    cfg = load_config(
        None, ["experiment=vae", "flow.name=planar", "flow.k=4", f"train.flow_lr_scale={scale}"]
    )
    torch.manual_seed(0)
    model = FlowVAE(x_dim=20, latent_dim=3, hidden=[16], flow_name="planar", k=4)
    x = torch.bernoulli(torch.full((8, 20), 0.3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = flow_head_groups(model, cfg.train.lr, cfg.train.flow_lr_scale)
    optimizer = make_optimizer(cfg, groups)
    negative_elbo(model, x).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()

    def moved(head: bool) -> torch.Tensor:
        # Adam's first step is lr · g / (|g| + eps): lr wherever |g| dwarfs eps = 1e-8.
        steps = [
            (p.detach() - before[n])[grads[n].abs() > 1e-5].abs()
            for n, p in model.named_parameters()
            if n.startswith("flow_head.") == head
        ]
        return torch.cat(steps)

    return moved(True), moved(False), cfg.train.lr


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_flow_head_steps_at_its_scaled_learning_rate(scale):
    head, rest, lr = first_adam_step(scale)
    assert head.numel() > 0 and rest.numel() > 0
    torch.testing.assert_close(head, torch.full_like(head, lr * scale), rtol=1e-3, atol=0)
    torch.testing.assert_close(rest, torch.full_like(rest, lr), rtol=1e-3, atol=0)
