"""The compiled CPU planar kernel (planar_kernel.py, planar_cpu.c) against the layers run one by
one with the reference autograd ops, and its build, switch and fallbacks."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from planar_reference import assert_agree, gradcheck_inputs, layer_by_layer, values_and_grads

from flowvae import flows
from flowvae.flows import planar_kernel
from flowvae.flows.planar import IDENTITY_SHIFT, SLACK, Planar
from flowvae.flows.planar_fused import planar_forward_fused
from flowvae.flows.planar_stack import planar_stack_forward

needs_kernel = pytest.mark.skipif(
    planar_kernel.library() is None, reason=f"planar kernel {planar_kernel.status()}"
)


def _kernel(scaled, shift):
    return lambda z, p: planar_kernel.planar_kernel_forward(z, p, scaled, SLACK, shift)


def test_the_kernel_builds_where_there_is_a_c_compiler():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    if os.environ.get("FLOWVAE_PLANAR_KERNEL", "1") == "0":
        pytest.skip("switched off by FLOWVAE_PLANAR_KERNEL=0")
    assert planar_kernel.library() is not None, planar_kernel.status()
    assert planar_kernel.status() == "compiled C"


@needs_kernel
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("batch_params", [1, 6], ids=["global", "amortised"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("shift", [0.0, IDENTITY_SHIFT])
@pytest.mark.parametrize("k,dim", [(1, 5), (7, 2), (20, 5), (3, 40)])
def test_kernel_matches_layers_values_and_gradients(scaled, batch_params, scale, shift, k, dim):
    gen = torch.Generator().manual_seed(k * 100 + dim)
    z = torch.randn(6, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    packed = scale * torch.randn(batch_params, k, 2 * dim + 1, generator=gen, dtype=torch.float64)
    packed.requires_grad_()
    gy = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(6, generator=gen, dtype=torch.float64)
    ref = values_and_grads(lambda z, p: layer_by_layer(z, p, scaled, shift), z, packed, gy, gld)
    got = values_and_grads(_kernel(scaled, shift), z, packed, gy, gld)
    assert_agree(got, ref)


@needs_kernel
@pytest.mark.parametrize("case", range(4), ids=["tiny_w", "wu_plus", "wu_minus", "huge_b"])
@pytest.mark.parametrize("scaled", [True, False])
def test_kernel_on_adversarial_parameters(case, scaled):
    dim, batch, k = 5, 6, 3
    layers = [p.reshape(batch, 1, -1) for p in Planar.stress_params(dim, batch, torch.float64)]
    packed = layers[case].repeat(1, k, 1).requires_grad_()
    gen = torch.Generator().manual_seed(case)
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(batch, generator=gen, dtype=torch.float64)
    got = values_and_grads(_kernel(scaled, 0.0), z, packed, gy, gld)
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2]))
    ref = values_and_grads(lambda z, p: layer_by_layer(z, p, scaled, 0.0), z, packed, gy, gld)
    assert_agree(got, ref)


@needs_kernel
@pytest.mark.parametrize("batch_params", [1, 4], ids=["global", "amortised"])
@pytest.mark.parametrize("scaled", [True, False])
def test_kernel_gradcheck(batch_params, scaled):
    z, packed = gradcheck_inputs(batch_params)
    assert torch.autograd.gradcheck(_kernel(scaled, 0.0), (z, packed), eps=1e-6, atol=1e-6)


@needs_kernel
def test_float32_follows_float64():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    packed = 0.1 * torch.randn(16, 80, 81, generator=gen, dtype=torch.float64)
    y64, ld64 = planar_kernel.planar_kernel_forward(z, packed, True, SLACK)
    y32, ld32 = planar_kernel.planar_kernel_forward(z.float(), packed.float(), True, SLACK)
    assert y32.dtype == ld32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld32.double(), ld64, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_inference_mode_gives_the_same_values_and_keeps_no_graph():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(5, 4, generator=gen)
    packed = torch.randn(5, 6, 9, generator=gen).requires_grad_()
    y, ld = planar_kernel.planar_kernel_forward(z, packed, True, SLACK)
    with torch.inference_mode():
        y_inf, ld_inf = planar_kernel.planar_kernel_forward(z, packed, True, SLACK)
    assert y_inf.grad_fn is None and not y_inf.requires_grad
    torch.testing.assert_close(y_inf, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ld_inf, ld.detach(), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("amortized", [True, False])
def test_flowstack_runs_the_kernel_on_cpu_and_agrees_with_the_layers(monkeypatch, amortized):
    torch.manual_seed(0)
    stack = flows.build("planar", 4, 9, amortized=amortized).double()
    z = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    params = torch.randn(8, stack.num_params, dtype=torch.float64) if amortized else None
    y, ld = stack(z, params)
    assert type(y.grad_fn).__name__ == "PlanarKernelFunctionBackward"
    (y.sum() + ld.sum()).backward()
    g_kernel = [p.grad.clone() for p in stack.parameters()] + [z.grad.clone()]
    monkeypatch.setattr("flowvae.flows.planar.FUSED", False)
    stack.zero_grad()
    z.grad = None
    y_ref, ld_ref = stack(z, params)
    assert "PlanarKernel" not in type(y_ref.grad_fn).__name__
    (y_ref.sum() + ld_ref.sum()).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)
    g_ref = [p.grad for p in stack.parameters()] + [z.grad]
    for a, b in zip(g_kernel, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def _status_in_subprocess(env: dict) -> dict:
    code = (
        "import json, torch\n"
        "from flowvae import flows\n"
        "from flowvae.flows import planar_kernel\n"
        "stack = flows.build('planar', 3, 4)\n"
        "y, ld = stack(torch.randn(5, 3))\n"
        "print(json.dumps({'status': planar_kernel.status(),\n"
        "                  'node': type(y.grad_fn).__name__,\n"
        "                  'finite': bool(torch.isfinite(y).all() and torch.isfinite(ld).all())}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_kernel
def test_first_use_builds_into_a_fresh_cache(tmp_path):
    out = _status_in_subprocess({"FLOWVAE_CACHE": str(tmp_path)})
    assert out == {"status": "compiled C", "node": "PlanarKernelFunctionBackward", "finite": True}
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built  # no temporary files left


def test_switched_off_or_unbuildable_falls_back_to_pytorch(tmp_path):
    off = _status_in_subprocess({"FLOWVAE_PLANAR_KERNEL": "0"})
    assert off["status"].startswith("off") and off["finite"]
    assert off["node"] == "PlanarStackFunctionBackward"
    broken = _status_in_subprocess({"FLOWVAE_CACHE": str(tmp_path), "CC": "false"})
    assert broken["status"].startswith("unavailable") and broken["finite"], broken
    assert broken["node"] == "PlanarStackFunctionBackward"


@needs_kernel
def test_a_foreign_or_truncated_library_in_the_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWVAE_CACHE", str(tmp_path))
    path = planar_kernel.library_path(planar_kernel._compiler())
    path.write_bytes(b"\x7fELF truncated")
    handle = planar_kernel._build()
    assert handle.planar_abi_version() == planar_kernel.ABI_VERSION
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@needs_kernel
@pytest.mark.parametrize(
    "z_shape,p_shape,dtype",
    [
        ((4, 3), (4, 2, 6), torch.float64),  # last axis is not 2D + 1
        ((4, 3), (2, 2, 7), torch.float64),  # neither one parameter row nor one per row
        ((4, 3), (4, 14), torch.float64),  # not (P, K, 2D + 1)
        ((4, 3), (4, 2, 7), torch.float16),  # no half-precision kernel
    ],
)
def test_mismatched_inputs_are_a_clear_error_not_a_crash(z_shape, p_shape, dtype):
    z = torch.randn(z_shape, dtype=torch.float64)
    params = torch.randn(p_shape, dtype=torch.float64).to(dtype)
    assert not planar_kernel.usable(z, params)
    with pytest.raises(ValueError, match="planar kernel: expected"):
        planar_kernel.planar_kernel_forward(z, params, True, SLACK)


def test_a_flow_stack_rejects_z_of_the_wrong_width():
    stack = flows.build("planar", 4, 9)
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 4\), got \(3, 300000\)"):
        stack(torch.randn(3, 300000))


@pytest.mark.parametrize("path", ["kernel", "stack", "layer"])
def test_double_backward_is_refused_not_wrong(path, monkeypatch):
    if path == "kernel" and planar_kernel.library() is None:
        pytest.skip(f"planar kernel {planar_kernel.status()}")
    if path != "kernel":
        monkeypatch.setattr("flowvae.flows.planar_kernel.usable", lambda z, p: False)
    stack = flows.build("planar", 2, 1 if path == "layer" else 3).double()
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    if path == "layer":
        y, ld = stack.layers[0](z)
    else:
        y, ld = stack(z)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(ld.sum(), z, create_graph=True)


@pytest.mark.parametrize("path", ["kernel", "stack", "layer"])
@pytest.mark.parametrize("scaled", [True, False])
def test_clamped_w_norm_passes_no_gradient_like_the_reference(path, scaled, monkeypatch):
    """‖w‖² below the smallest normal number is clamped; the clamp's gradient is zero, which
    every fused path must reproduce (else inf/NaN gradients for w)."""
    if path == "kernel" and planar_kernel.library() is None:
        pytest.skip(f"planar kernel {planar_kernel.status()}")
    dim = 2
    u = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    w = torch.tensor([[1e-160, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.7]], dtype=torch.float64)
    packed = torch.cat([u, w, b], dim=1).unsqueeze(1).repeat(3, 1, 1).requires_grad_()
    z = torch.tensor([[0.3, -0.2], [1.0, 0.4], [-0.5, 2.0]], dtype=torch.float64)
    z.requires_grad_()
    gy = torch.ones(3, dim, dtype=torch.float64)
    gld = torch.ones(3, dtype=torch.float64)
    ref = values_and_grads(lambda z, p: layer_by_layer(z, p, scaled, 0.0), z, packed, gy, gld)
    if path == "kernel":
        fn = _kernel(scaled, 0.0)
    elif path == "stack":
        fn = lambda z, p: planar_stack_forward(z, p, scaled, SLACK, 0.0)  # noqa: E731
    else:

        def fn(z, p):
            d = z.shape[-1]
            q = p[:, 0]
            return planar_forward_fused(z, q[:, :d], q[:, d : 2 * d], q[:, 2 * d :], scaled, SLACK)

    got = values_and_grads(fn, z, packed, gy, gld)
    assert all(torch.isfinite(g).all() for g in got[2]), got[2]
    assert all(torch.isfinite(g).all() for g in ref[2]), ref[2]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=1e-11)
    for g_got, g_ref in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=0.0)
