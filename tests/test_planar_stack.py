"""The stacked planar path (planar_stack.py) against the layers run one by one with the
reference autograd ops: values, gradients of every input, the clamp and double-backward edge
cases, and the fallbacks."""

import pytest
import torch
from planar_reference import assert_agree, gradcheck_inputs, layer_by_layer, values_and_grads

from flowvae import flows
from flowvae.flows import planar_stack
from flowvae.flows.planar import IDENTITY_SHIFT, SLACK, Planar
from flowvae.flows.planar_stack import planar_stack_forward
from flowvae.flows.stack import FlowStack


def _stack(scaled, shift, block=None):
    return lambda z, p: planar_stack_forward(z, p, scaled, SLACK, shift, block)


def _reference(scaled, shift):
    return lambda z, p: layer_by_layer(z, p, scaled, shift)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("batch_params", [1, 6], ids=["global", "amortised"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("shift", [0.0, IDENTITY_SHIFT])
@pytest.mark.parametrize(
    "k,dim,block",
    [(1, 5, 16), (7, 2, 3), (7, 5, 7), (12, 5, 16), (20, 5, 8), (3, 40, 2), (25, 3, None)],
)
def test_stack_matches_layers_values_and_gradients(
    scaled, batch_params, scale, shift, k, dim, block
):
    gen = torch.Generator().manual_seed(k * 100 + dim)
    z = torch.randn(6, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    packed = scale * torch.randn(batch_params, k, 2 * dim + 1, generator=gen, dtype=torch.float64)
    packed.requires_grad_()
    gy = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(6, generator=gen, dtype=torch.float64)
    ref = values_and_grads(_reference(scaled, shift), z, packed, gy, gld)
    got = values_and_grads(_stack(scaled, shift, block), z, packed, gy, gld)
    assert_agree(got, ref)


@pytest.mark.parametrize("case", range(4), ids=["tiny_w", "wu_plus", "wu_minus", "huge_b"])
@pytest.mark.parametrize("scaled", [True, False])
def test_stack_on_adversarial_parameters(case, scaled):
    dim, batch, k = 5, 6, 3
    layers = [p.reshape(batch, 1, -1) for p in Planar.stress_params(dim, batch, torch.float64)]
    packed = layers[case].repeat(1, k, 1).requires_grad_()
    gen = torch.Generator().manual_seed(case)
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(batch, generator=gen, dtype=torch.float64)
    got = values_and_grads(_stack(scaled, 0.0), z, packed, gy, gld)
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2]))
    assert_agree(got, values_and_grads(_reference(scaled, 0.0), z, packed, gy, gld))


@pytest.mark.parametrize("scaled", [True, False])
def test_clamped_w_norm_passes_no_gradient_like_the_reference(scaled):
    """‖w‖ = 1e-160 squares below the smallest normal number and is clamped; the clamp passes no
    gradient in the reference ops, and the hand-written backward must agree (else inf/NaN)."""
    u = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    w = torch.tensor([[1e-160, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.7]], dtype=torch.float64)
    packed = torch.cat([u, w, b], dim=1).unsqueeze(1).repeat(3, 1, 1).requires_grad_()
    z = torch.tensor([[0.3, -0.2], [1.0, 0.4], [-0.5, 2.0]], dtype=torch.float64)
    z.requires_grad_()
    gy = torch.ones(3, 2, dtype=torch.float64)
    gld = torch.ones(3, dtype=torch.float64)
    ref = values_and_grads(_reference(scaled, 0.0), z, packed, gy, gld)
    got = values_and_grads(_stack(scaled, 0.0), z, packed, gy, gld)
    assert all(torch.isfinite(g).all() for g in got[2]), got[2]
    assert all(torch.isfinite(g).all() for g in ref[2]), ref[2]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=1e-11)
    for g_got, g_ref in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("batch_params", [1, 4], ids=["global", "amortised"])
@pytest.mark.parametrize("scaled", [True, False])
def test_stack_gradcheck(batch_params, scaled):
    z, packed = gradcheck_inputs(batch_params)
    assert torch.autograd.gradcheck(_stack(scaled, 0.0, 2), (z, packed), eps=1e-6, atol=1e-6)


def test_double_backward_is_refused_not_wrong():
    stack = flows.build("planar", 2, 3).double()
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    y, ld = stack(z)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(ld.sum(), z, create_graph=True)


@pytest.mark.parametrize("batch_params", [1, 4], ids=["global", "amortised"])
def test_a_retained_graph_gives_the_same_gradients_twice(batch_params):
    """The amortised backward pass reuses a forward buffer for ∂L/∂a; a second backward pass
    through a retained graph must still see the forward's values."""
    z, packed = gradcheck_inputs(batch_params)
    y, ld = planar_stack_forward(z, packed, True, SLACK, IDENTITY_SHIFT)
    loss = (y * y).sum() + ld.sum()
    first = torch.autograd.grad(loss, (z, packed), retain_graph=True)
    second = torch.autograd.grad(loss, (z, packed))
    ref = values_and_grads(_reference(True, IDENTITY_SHIFT), z, packed, 2 * y.detach(), 1.0)
    for a, b, r in zip(first, second, ref[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_float32_follows_float64():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    packed = 0.1 * torch.randn(16, 80, 81, generator=gen, dtype=torch.float64)
    y64, ld64 = planar_stack_forward(z, packed, True, SLACK)
    y32, ld32 = planar_stack_forward(z.float(), packed.float(), True, SLACK)
    assert y32.dtype == ld32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld32.double(), ld64, rtol=1e-4, atol=1e-4)


def test_inference_mode_gives_the_same_values_and_keeps_no_graph():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(5, 4, generator=gen)
    packed = torch.randn(5, 6, 9, generator=gen).requires_grad_()
    y, ld = planar_stack_forward(z, packed, True, SLACK)
    with torch.inference_mode():
        y_inf, ld_inf = planar_stack_forward(z, packed, True, SLACK)
    assert y_inf.grad_fn is None and not y_inf.requires_grad
    torch.testing.assert_close(y_inf, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ld_inf, ld.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("amortized", [True, False])
def test_flowstack_takes_the_stacked_path_and_agrees_with_the_layers(monkeypatch, amortized):
    torch.manual_seed(0)
    stack = flows.build("planar", 4, 9, amortized=amortized).double()
    z = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    params = torch.randn(8, stack.num_params, dtype=torch.float64) if amortized else None
    y, ld = stack(z, params)
    stacked = (
        "PlanarSharedStackFunctionBackward" if not amortized else "PlanarStackFunctionBackward"
    )
    assert type(y.grad_fn).__name__ == stacked
    (y.sum() + ld.sum()).backward()
    g_stack = [p.grad.clone() for p in stack.parameters()] + [z.grad.clone()]
    monkeypatch.setattr("flowvae.flows.planar.STACKED", False)
    stack.zero_grad()
    z.grad = None
    y_ref, ld_ref = stack(z, params)
    assert "PlanarStack" not in type(y_ref.grad_fn).__name__
    (y_ref.sum() + ld_ref.sum()).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)
    g_ref = [p.grad for p in stack.parameters()] + [z.grad]
    for a, b in zip(g_stack, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_large_batches_fall_back_to_layers(monkeypatch):
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


def test_a_flow_stack_rejects_z_of_the_wrong_width():
    stack = flows.build("planar", 4, 9)
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 4\), got \(3, 300000\)"):
        stack(torch.randn(3, 300000))


def test_stack_keeps_dtype_and_shapes():
    z = torch.randn(3, 2)
    packed = 0.1 * torch.randn(3, 4, 5)
    y, ld = planar_stack_forward(z, packed, True, SLACK)
    assert y.shape == (3, 2) and ld.shape == (3,)
    assert y.dtype == ld.dtype == torch.float32


@pytest.mark.parametrize(
    "k,expected", [(1, 1), (10, 10), (32, 32), (33, 17), (41, 21), (65, 22), (80, 27)]
)
def test_blocks_are_equal_and_at_most_block(k, expected):
    size = planar_stack.block_size(k)
    assert size == expected
    blocks = -(-k // size)
    assert size <= planar_stack.BLOCK and blocks * size - k < blocks  # nearly equal blocks
