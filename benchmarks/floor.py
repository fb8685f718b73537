"""The floor under a training step: its matrix products and its optimiser step, run alone.

A step cannot be faster than the GEMMs it must do (each Linear's forward product, the product
for its input's gradient when the input needs one, the product for its weight's gradient) at
the rate this machine reaches for exactly those shapes, plus the optimiser's own update over
the same parameters. ``floor_fns(trainer, step)`` records those products from one real step
(forward hooks on every ``nn.Linear``: rows, shapes, whether the input needs a gradient) and
returns a callable that runs each of them once on operands of the same shapes, then one
optimiser step: timed beside the step itself, floor time / step time says how close the step
is to this limit.

What the floor leaves out is everything else a step must also do: elementwise work (maxout,
sampling, the loss), bias gradients, the flow layers' own small ops, and the framework's
dispatch and autograd bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Product:
    """One Linear as a step uses it: ``rows`` input rows, and whether the input needs a grad."""

    weight: Tensor
    bias: Tensor | None
    rows: int
    input_grad: bool

    @property
    def flops(self) -> int:
        out_features, in_features = self.weight.shape
        return 2 * self.rows * in_features * out_features * (3 if self.input_grad else 2)


def record_products(model: nn.Module, step) -> list[Product]:
    """Run ``step()`` once with hooks on every Linear of ``model``; one Product per call."""
    seen: list[Product] = []

    def hook(module: nn.Linear, inputs, _output) -> None:
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        seen.append(Product(module.weight, module.bias, rows, x.requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def products_fn(products: list[Product]):
    """A callable doing each product's forward GEMM, input-gradient GEMM (if any) and
    weight-gradient GEMM once, with the layouts nn.Linear's forward and backward use."""
    operands = []
    for p in products:
        w = p.weight.detach()
        b = None if p.bias is None else p.bias.detach()
        x = torch.randn(p.rows, w.shape[1], device=w.device)
        g = torch.randn(p.rows, w.shape[0], device=w.device)
        operands.append((w, b, x, g, p.input_grad))

    def run() -> None:
        for w, b, x, g, input_grad in operands:
            if b is None:
                torch.mm(x, w.t())
            else:
                torch.addmm(b, x, w.t())
            if input_grad:
                torch.mm(g, w)
            torch.mm(g.t(), x)

    return run


def floor_fns(trainer, step) -> tuple[dict, list[Product]]:
    """({"floor": callable, "optimizer": callable}, products) for ``trainer``'s step.

    ``step()`` is run once to record the products and to leave every parameter a gradient and
    the optimiser its state. "floor" runs every product once and then one optimiser step, in the
    order a step runs them, so that the products meet their weights as they do in training:
    after the optimiser has streamed the parameters and both moments (about 16 bytes per
    parameter, several times the last-level cache) through memory. "optimizer" is the optimiser
    step alone, to split the floor in two. The trainer is consumed: its weights move with each
    call, which changes no timing."""
    products = record_products(trainer.model, step)
    gemms = products_fn(products)
    optimizer = trainer.optimizer

    def optimizer_step() -> None:
        optimizer.step()

    def floor() -> None:
        gemms()
        optimizer.step()

    return {"floor": floor, "optimizer": optimizer_step}, products
