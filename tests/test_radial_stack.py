"""The one-pass radial stack (radial_stack.py) against the layers run one by one through the
reference ops of radial.py: values, log-dets and the gradients of z and of every parameter, in
float64, for amortised, shared and global parameters and on the family's hardest parameters."""

import pytest
import torch

from flowvae import flows
from flowvae.flows.radial import Radial


def _run(stack, z, params, gy, gld):
    z = z.clone().requires_grad_()
    y, ld = stack(z, params)
    leaves = [z] + ([params] if params is not None else list(stack.parameters()))
    grads = torch.autograd.grad((y * gy).sum() + (ld * gld).sum(), leaves)
    return y, ld, grads


def _stacked_and_reference(monkeypatch, stack, z, params):
    gen = torch.Generator().manual_seed(7)
    gy = torch.randn(z.shape, generator=gen, dtype=z.dtype)
    gld = torch.randn(z.shape[0], generator=gen, dtype=z.dtype)
    assert Radial.stack_forward(list(stack.layers), z, params) is not None  # the one-pass path
    got = _run(stack, z, params, gy, gld)
    monkeypatch.setattr("flowvae.flows.radial.STACKED", False)
    ref = _run(stack, z, params, gy, gld)
    return got, ref


def _assert_agree(got, ref):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    assert not torch.equal(got[0], torch.zeros_like(got[0]))
    # The stack sums the K log-dets in one reduction, the reference one layer at a time.
    torch.testing.assert_close(
        got[1], ref[1], rtol=1e-12, atol=1e-12 * float(ref[1].detach().abs().max())
    )
    for g_got, g_ref in zip(got[2], ref[2], strict=True):
        scale = 1.0 + float(g_ref.detach().abs().max())
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("rows", ["amortised", "shared", "global"])
@pytest.mark.parametrize("k,dim", [(1, 1), (3, 2), (10, 40), (32, 2)])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_stack_matches_layers(monkeypatch, rows, k, dim, scale):
    gen = torch.Generator().manual_seed(k * 100 + dim)
    batch = 9
    stack = flows.build("radial", dim, k, amortized=rows != "global").double()
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    params = None
    if rows != "global":
        p_rows = batch if rows == "amortised" else 1
        params = scale * torch.randn(p_rows, stack.num_params, generator=gen, dtype=torch.float64)
        params.requires_grad_()
    else:
        with torch.no_grad():
            for p in stack.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    _assert_agree(*_stacked_and_reference(monkeypatch, stack, z, params))


@pytest.mark.parametrize("case", range(4))
def test_stack_on_adversarial_parameters(monkeypatch, case):
    dim, batch, k = 4, 6, 3
    layer = Radial.stress_params(dim, batch, torch.float64)[case]
    params = layer.repeat(1, k).requires_grad_()
    stack = flows.build("radial", dim, k, amortized=True).double()
    gen = torch.Generator().manual_seed(case)
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    got, ref = _stacked_and_reference(monkeypatch, stack, z, params)
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2]))
    _assert_agree(got, ref)


def test_stack_log_det_is_the_jacobian():
    # Independent of the reference ops: Σ log|det J| against autograd's Jacobian of z_K.
    gen = torch.Generator().manual_seed(3)
    stack = flows.build("radial", 3, 4, amortized=True).double()
    params = torch.randn(1, stack.num_params, generator=gen, dtype=torch.float64)
    for z in torch.randn(4, 1, 3, generator=gen, dtype=torch.float64):
        jac = torch.autograd.functional.jacobian(lambda x: stack(x, params)[0], z)[0, :, 0, :]
        _, ld = stack(z, params)
        torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


def test_stack_gradcheck():
    gen = torch.Generator().manual_seed(5)
    stack = flows.build("radial", 3, 5, amortized=True).double()
    z = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    params = torch.randn(4, stack.num_params, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: stack(a, b), (z, params.requires_grad_()))


def test_a_point_on_the_reference_point_gets_autograds_gradient(monkeypatch):
    # r = 0: the norm's gradient is 0 there (autograd's convention), not 0/0
    gen = torch.Generator().manual_seed(11)
    dim, k, batch = 3, 4, 5
    stack = flows.build("radial", dim, k, amortized=True).double()
    params = torch.randn(batch, stack.num_params, generator=gen, dtype=torch.float64)
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z[:2] = params[:2, :dim]  # rows 0 and 1 start on their first layer's z0
    got, ref = _stacked_and_reference(monkeypatch, stack, z, params.requires_grad_())
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2]))
    _assert_agree(got, ref)


def test_double_backward_is_refused_with_a_way_out():
    stack = flows.build("radial", 2, 3, amortized=False).double()
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    _, ld = stack(z)
    with pytest.raises(RuntimeError, match="radial.STACKED = False"):
        torch.autograd.grad(ld.sum(), z, create_graph=True)
