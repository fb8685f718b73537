"""The stacked planar path (planar_stack.py) against the layers run one by one with the
reference autograd ops: values, gradients of every input, and the fallbacks."""

import pytest
import torch
from planar_reference import assert_agree, gradcheck_inputs, layer_by_layer, values_and_grads

from flowvae import flows
from flowvae.flows import planar_stack
from flowvae.flows.planar import IDENTITY_SHIFT, SLACK, Planar
from flowvae.flows.planar_stack import planar_stack_forward
from flowvae.flows.stack import FlowStack


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("batch_params", [1, 6], ids=["global", "amortised"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("shift", [0.0, IDENTITY_SHIFT])
@pytest.mark.parametrize("k,block", [(1, 16), (7, 3), (7, 7), (12, 16), (20, 8)])
def test_stack_matches_layers_values_and_gradients(scaled, batch_params, scale, shift, k, block):
    gen = torch.Generator().manual_seed(k * 100 + block)
    dim = 5
    z = torch.randn(6, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    packed = scale * torch.randn(batch_params, k, 2 * dim + 1, generator=gen, dtype=torch.float64)
    packed.requires_grad_()
    gy = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(6, generator=gen, dtype=torch.float64)

    ref = values_and_grads(lambda z, p: layer_by_layer(z, p, scaled, shift), z, packed, gy, gld)
    got = values_and_grads(
        lambda z, p: planar_stack_forward(z, p, scaled, SLACK, shift, block), z, packed, gy, gld
    )
    assert_agree(got, ref)


@pytest.mark.parametrize("batch_params", [1, 4], ids=["global", "amortised"])
@pytest.mark.parametrize("scaled", [True, False])
def test_stack_gradcheck(batch_params, scaled):
    z, packed = gradcheck_inputs(batch_params)
    assert torch.autograd.gradcheck(
        lambda z, p: planar_stack_forward(z, p, scaled, SLACK, 0.0, 2),
        (z, packed),
        eps=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("amortized", [True, False])
def test_flowstack_takes_the_stacked_path_and_agrees_with_the_layers(monkeypatch, amortized):
    # The path CUDA takes (and the CPU without the compiled kernel).
    monkeypatch.setattr("flowvae.flows.planar_kernel.usable", lambda z, p: False)
    torch.manual_seed(0)
    stack = flows.build("planar", 4, 9, amortized=amortized).double()
    z = torch.randn(8, 4, dtype=torch.float64)
    params = torch.randn(8, stack.num_params, dtype=torch.float64) if amortized else None
    calls = []
    real = planar_stack.PlanarStackFunction.apply
    monkeypatch.setattr(
        planar_stack.PlanarStackFunction, "apply", lambda *a: calls.append(1) or real(*a)
    )
    y, ld = stack(z, params)
    assert calls, "a homogeneous planar stack should run as one stacked node"
    monkeypatch.setattr("flowvae.flows.planar.FUSED", False)
    y_ref, ld_ref = stack(z, params)
    assert len(calls) == 1, "FUSED = False must run the layers one by one"
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)


def test_large_batches_fall_back_to_layers(monkeypatch):
    monkeypatch.setattr("flowvae.flows.planar_kernel.usable", lambda z, p: False)
    torch.manual_seed(1)
    stack = flows.build("planar", 3, 4, amortized=True).double()
    z = torch.randn(10, 3, dtype=torch.float64)
    params = torch.randn(10, stack.num_params, dtype=torch.float64)
    y, ld = stack(z, params)
    monkeypatch.setattr("flowvae.flows.planar.MAX_COUPLING_ELEMENTS", 10 * 4 * 4 - 1)
    assert Planar.stack_forward(stack.layers, z, params) is None
    y_small, ld_small = stack(z, params)
    torch.testing.assert_close(y_small, y)
    torch.testing.assert_close(ld_small, ld)


def test_mixed_layer_options_are_not_stacked():
    layers = [Planar(3, offset="scaled"), Planar(3, offset="free")]
    assert Planar.stack_forward(layers, torch.randn(2, 3), None) is None
    stack = FlowStack(layers, 3).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    y, ld = stack(z)
    ref = z
    total = torch.zeros(5, dtype=torch.float64)
    for layer in layers:
        ref, ld_layer = layer(ref)
        total = total + ld_layer
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(ld, total)


def test_stack_keeps_dtype_and_shapes():
    z = torch.randn(3, 2)
    packed = 0.1 * torch.randn(3, 4, 5)
    y, ld = planar_stack_forward(z, packed, True, SLACK)
    assert y.shape == (3, 2) and ld.shape == (3,)
    assert y.dtype == ld.dtype == torch.float32


@pytest.mark.parametrize(
    "k,expected", [(1, 1), (10, 10), (20, 20), (21, 11), (30, 15), (41, 14), (80, 20)]
)
def test_blocks_are_equal_and_at_most_block(k, expected):
    size = planar_stack.block_size(k)
    assert size == expected
    blocks = -(-k // size)
    assert size <= planar_stack.BLOCK and blocks * size - k < blocks  # nearly equal blocks
