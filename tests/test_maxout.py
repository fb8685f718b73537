"""Maxout's hand-written backward (flowvae.nets.WindowMax) against max_pool1d's, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from flowvae.nets import Maxout, WindowMax


def pooled(y: torch.Tensor, window: int) -> torch.Tensor:
    """The reference: max_pool1d with its own (argmax-recording) autograd."""
    return F.max_pool1d(y.reshape(-1, 1, y.shape[-1]), window).view(*y.shape[:-1], -1)


def grads(fn, y: torch.Tensor, window: int, g: torch.Tensor):
    y = y.clone().requires_grad_()
    out = fn(y, window)
    (grad,) = torch.autograd.grad(out, y, g)
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,window", [((100, 1600), 4), ((3, 7, 60), 3), ((5, 8), 2)])
def test_values_and_gradients_equal_max_pool1d(dtype, shape, window):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=gen, dtype=dtype)
    g = torch.randn(*shape[:-1], shape[-1] // window, generator=gen, dtype=dtype)
    out_ref, grad_ref = grads(pooled, y, window, g)
    out, grad = grads(WindowMax.apply, y, window, g)
    assert torch.equal(out, out_ref)
    assert torch.equal(grad, grad_ref)
    # one nonzero per window: the gradient is a subgradient of the max, not spread or doubled
    assert torch.equal(
        (grad != 0).unflatten(-1, (-1, window)).sum(-1), torch.ones_like(g, dtype=torch.long)
    )


def test_a_shared_maximum_sends_the_gradient_to_the_first_piece_only():
    # windows of 4 with the max at two, three or all four pieces, and at different positions
    y = torch.tensor(
        [[1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0, -1.0, -5.0, -1.0, -1.0, 0.0, 7.0, 1.0, 7.0]]
    )
    g = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out_ref, grad_ref = grads(pooled, y, 4, g)
    out, grad = grads(WindowMax.apply, y, 4, g)
    assert torch.equal(out, out_ref)
    assert torch.equal(grad, grad_ref)
    expected = torch.zeros(1, 16)
    expected[0, [1, 4, 8, 13]] = g[0]
    assert torch.equal(grad, expected)


def test_maxout_trains_as_with_max_pool1d():
    """Ten Adam steps of a Maxout layer: parameters identical to the max_pool1d layer's."""
    torch.manual_seed(0)
    ours = Maxout(30, 20, 4)
    ref = Maxout(30, 20, 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(64, 30)
    target = torch.randn(64, 20)
    for model, fn in ((ours, None), (ref, pooled)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(10):
            out = model(x) if fn is None else fn(model.linear(x), 4)
            loss = ((out - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_infinite_maxima_take_the_exact_rule():
    # inf - inf is NaN, so the float mask finds no winner there and the exact rule answers
    y = torch.tensor([[1.0, float("inf"), 0.0, 2.0, -float("inf"), -float("inf"), 5.0, 4.0]])
    g = torch.tensor([[3.0, 7.0]])
    out_ref, grad_ref = grads(pooled, y, 4, g)
    out, grad = grads(WindowMax.apply, y, 4, g)
    assert torch.equal(out, out_ref)
    assert torch.equal(grad, grad_ref)
    assert torch.equal(grad, torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0]]))
