"""Acceptance tests for the flow library, generic over the registry.

Every check runs for every name in ``flows.available()``: a new family registered with
``@FLOWS.register`` must pass this file unchanged. Its adversarial parameters come from the
family's own ``stress_params``; the only family-specific code is the table in
:func:`test_constraints`.

Log-dets are checked layer by layer, each example on its own row with its own parameters, against
``slogdet`` of the autograd Jacobian; the stack's log-det must then be the sum of its layers'. The
Jacobian of a whole stack is the product of the layers' and can be so ill-conditioned (an IAF
stack at |z| ~ 1e3) that ``slogdet`` of it is wrong by tens of nats while every factor is exact.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from flowvae import flows
from flowvae.flows.base import batch_dot
from flowvae.flows.planar import planar_uhat
from flowvae.flows.radial import radial_beta, radial_constants
from flowvae.flows.stack import FlowStack

F64 = torch.float64
NAMES = flows.available()
MODES = ("global", "amortized")
DIMS = (2, 5, 40)
BATCH = 4  # examples per amortised case; each gets its own autograd Jacobians
GLOBAL_STRESS_ROWS = 2  # stress rows loaded into global stacks (one stack copy each)
GLOBAL_STRESS_BATCH = 2  # z rows per such stack
K_RANDOM = 3  # depth of the stacks with random parameters
HUGE = 1e3  # "huge z": inputs scaled by this

LOGDET_ATOL = 1e-8
INVERSE_TOL = 1e-6
F32_RTOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the batches here are tiny, and on a shared 2-core machine a second
    OpenMP thread makes elementwise loops up to ~100x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers --------------------------------------------------------------------------------------
def generator(*key: object) -> torch.Generator:
    """A generator seeded from the test's own key, so every case is reproducible on its own."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randomize_(module: torch.nn.Module, gen: torch.Generator, scale: float = 1.0):
    """Overwrite every parameter with N(0, scale² / fan_in) noise, fan_in = size of the last axis."""
    with torch.no_grad():
        for p in module.parameters():
            fan = p.shape[-1] if p.dim() else 1
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(scale * noise / math.sqrt(fan))
    return module


def random_stack(
    name: str, dim: int, mode: str, k: int, gen: torch.Generator, scale: float = 1.0
) -> FlowStack:
    stack = flows.build(name, dim, k, amortized=mode == "amortized").to(F64)
    return randomize_(stack, gen, scale)


def global_holds_params(name: str, dim: int) -> bool:
    """Whether a global layer owns exactly the parameters an amortised one consumes."""
    cls = flows.get(name)
    return dict(cls(dim).global_shapes()) == dict(cls(dim, amortized=True).param_shapes())


def load_global_(layer: torch.nn.Module, row: Tensor) -> None:
    """Copy one raw amortised parameter vector into a global layer's nn.Parameters."""
    twin = type(layer)(layer.dim, amortized=True, index=layer.index)
    with torch.no_grad():
        for pname, value in twin.unpack(row.unsqueeze(0)).items():
            getattr(layer, pname).copy_(value[0])


def num_stress(name: str, dim: int) -> int:
    return len(flows.get(name).stress_params(dim, BATCH, F64))


def scaled_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max(1, |expected|): absolute for O(1) values, relative beyond."""
    return ((actual - expected).abs() / expected.abs().clamp_min(1.0)).max().item()


def assert_close_scaled(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = scaled_error(actual, expected)
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"


def assert_finite(*tensors: Tensor, what: str) -> None:
    for t in tensors:
        assert torch.isfinite(t).all(), f"{what}: non-finite values"


@dataclass
class Group:
    """One batched call: a stack, its per-example parameters (or None) and the inputs."""

    stack: FlowStack
    params: Tensor | None
    z: Tensor


def make_groups(name: str, mode: str, dim: int, case: str, huge: bool = False) -> list[Group]:
    """The inputs of one case.

    ``random``: a K=3 stack with random weights and, when amortised, random per-example
    parameters (different in every row). ``stressI``: a K=1 stack whose layer gets the I-th
    ``stress_params`` case; amortised, its rows are the batch; global, each of the first rows is
    loaded into its own copy of the stack. ``huge`` scales the inputs by 1e3.
    """
    gen = generator(name, mode, dim, case, huge)
    scale = HUGE if huge else 1.0
    if case == "random":
        stack = random_stack(name, dim, mode, K_RANDOM, gen)
        params = None
        if stack.amortized:
            params = torch.randn(BATCH, stack.num_params, generator=gen, dtype=F64)
        z = scale * torch.randn(BATCH, dim, generator=gen, dtype=F64)
        return [Group(stack, params, z)]
    raw = flows.get(name).stress_params(dim, BATCH, F64)[int(case.removeprefix("stress"))]
    stack = random_stack(name, dim, mode, 1, gen)
    if stack.amortized:
        assert raw.shape == (BATCH, stack.num_params), "stress_params has the wrong shape"
        z = scale * torch.randn(BATCH, dim, generator=gen, dtype=F64)
        return [Group(stack, raw, z)]
    groups = []
    for row in raw[:GLOBAL_STRESS_ROWS]:
        one = copy.deepcopy(stack)
        load_global_(one.layers[0], row)
        z = scale * torch.randn(GLOBAL_STRESS_BATCH, dim, generator=gen, dtype=F64)
        groups.append(Group(one, None, z))
    return groups


def case_params(with_huge: bool) -> list:
    """(name, mode, dim, case, huge) for every family, mode, dimension and parameter case."""
    out = []
    for name, mode, dim in itertools.product(NAMES, MODES, DIMS):
        cases = ["random"] + [f"stress{i}" for i in range(num_stress(name, dim))]
        for case, huge in itertools.product(cases, (False, True) if with_huge else (False,)):
            marks = ()
            if mode == "global" and case != "random" and not global_holds_params(name, dim):
                marks = pytest.mark.skip(
                    reason="stress_params are per-example inputs that this family's global "
                    "layers do not own"
                )
            cid = f"{name}-{mode}-D{dim}-{case}" + ("-hugez" if huge else "")
            out.append(pytest.param(name, mode, dim, case, huge, id=cid, marks=marks))
    return out


CASES_WITH_HUGE_Z = case_params(with_huge=True)
CASES = case_params(with_huge=False)


def slow_numerical_inverse(param):
    """A case whose inverse is solved numerically (no closed form) at D = 40 on stress
    parameters takes seconds, not milliseconds: it runs with the slow tests; its D = 2 and D = 5
    stress cases and its random D = 40 case stay in the fast set."""
    name, _, dim, case, _ = param.values
    if flows.get(name).exact_inverse or dim < 40 or case == "random":
        return param
    return pytest.param(*param.values, id=param.id, marks=[*param.marks, pytest.mark.slow])


INVERSE_CASES = [slow_numerical_inverse(p) for p in CASES]


# -- 1. log-det against the autograd Jacobian -----------------------------------------------------
@pytest.mark.parametrize("name, mode, dim, case, huge", CASES_WITH_HUGE_Z)
def test_log_det_matches_autograd_jacobian(name, mode, dim, case, huge):
    for g in make_groups(name, mode, dim, case, huge):
        z_out, log_det = g.stack(g.z, g.params)
        assert z_out.shape == g.z.shape and log_det.shape == (g.z.shape[0],)
        assert_finite(z_out, log_det, what="forward")

        x, total = g.z, torch.zeros_like(log_det)
        for k, (layer, chunk) in enumerate(zip(g.stack.layers, g.stack.split(g.params))):
            x_next, layer_log_det = layer(x, chunk)
            assert_finite(x_next, layer_log_det, what=f"layer {k}")

            # Rows are independent, so the Jacobian of the rows' sum is every row's own:
            # jacs[i] is example i's. (Rows that interacted would add to it.)
            def f(rows, layer=layer, chunk=chunk):
                return layer(rows, chunk)[0].sum(0)

            jacs = torch.autograd.functional.jacobian(f, x, vectorize=True).transpose(0, 1)
            signs, logabss = torch.linalg.slogdet(jacs)
            for i, (sign, logabs) in enumerate(zip(signs, logabss, strict=True)):
                where = f"layer {k}, example {i}"
                if layer.orientation_preserving:
                    assert sign.item() == 1.0, f"{where}: det J has sign {sign.item()}"
                else:
                    assert abs(sign.item()) == 1.0, f"{where}: det J is 0"
                err = (layer_log_det[i] - logabs).abs().item()
                assert err <= LOGDET_ATOL, (
                    f"{where}: log_abs_det {layer_log_det[i].item():.12g} vs autograd "
                    f"{logabs.item():.12g} (error {err:.2e})"
                )
            x, total = x_next, total + layer_log_det
        # A family may run its stack as one node (planar: planar_stack.py) whose rounding
        # differs from the layers'; the stress cases' wᵀu = ±1e4 cancels 4 digits in û.
        assert_close_scaled(z_out, x, 1e-10, "stack output vs its layers in turn")
        assert_close_scaled(log_det, total, 1e-10, "stack log-det vs the sum of its layers'")


# -- 2. parameter constraints (the only family-specific table) -----------------------------------
def planar_margin(p: dict[str, Tensor]) -> Tensor:
    """wᵀû + 1, which must be > 0."""
    return batch_dot(p["w"], planar_uhat(p["u"], p["w"])) + 1.0


def radial_margin(p: dict[str, Tensor]) -> Tensor:
    """min(α, s = α + β, β + α with β from radial_beta): all must be > 0."""
    alpha, s = radial_constants(p["alpha"], p["beta"])
    beta = radial_beta(p["alpha"], p["beta"])
    return torch.stack([alpha, s, beta + alpha]).amin(0)


CONSTRAINTS = {"planar": planar_margin, "radial": radial_margin}


@pytest.mark.parametrize("name", NAMES)
def test_constraints(name):
    if name not in CONSTRAINTS:
        pytest.skip(f"flow '{name}' has no parameter constraint")
    margin_of = CONSTRAINTS[name]
    for mode in MODES:
        for dim in DIMS:
            for case in ["random"] + [f"stress{i}" for i in range(num_stress(name, dim))]:
                for g in make_groups(name, mode, dim, case):
                    for layer, chunk in zip(g.stack.layers, g.stack.split(g.params)):
                        margin = margin_of(layer.unpack(chunk))
                        assert torch.isfinite(margin).all() and (margin > 0).all(), (
                            f"{mode} D={dim} {case}: constraint margin {margin}"
                        )


# -- 3. invertibility, finiteness and gradients ---------------------------------------------------
@pytest.mark.parametrize("name, mode, dim, case, huge", INVERSE_CASES)
def test_inverse_round_trips(name, mode, dim, case, huge):
    assert not huge  # CASES are at unit scale
    gen = generator("y", name, mode, dim, case)
    for g in make_groups(name, mode, dim, case):
        y, log_det = g.stack(g.z, g.params)
        assert_finite(y, log_det, what="forward")
        assert_close_scaled(g.stack.inverse(y, g.params), g.z, INVERSE_TOL, "inverse(forward(z))")

        y2 = torch.randn(g.z.shape, generator=gen, dtype=F64)
        z2, log_det2 = g.stack.inverse_with_log_det(y2, g.params)
        assert_finite(z2, log_det2, what="inverse_with_log_det")
        y2_back, log_det3 = g.stack(z2, g.params)
        assert_close_scaled(y2_back, y2, INVERSE_TOL, "forward(inverse(y))")
        assert_close_scaled(log_det2, log_det3, 1e-12, "inverse_with_log_det log-det")


@pytest.mark.parametrize("name, mode, dim, case, huge", CASES)
def test_gradients_finite_and_reach_parameters(name, mode, dim, case, huge):
    assert not huge  # CASES are at unit scale
    """Random parameters: every nn.Parameter and every column of the amortised parameters gets a
    non-zero finite gradient. Stress parameters: every gradient is finite (saturated cases may
    legitimately have exact zeros)."""
    gen = generator("grad", name, mode, dim, case)
    require_nonzero = case == "random"
    for g in make_groups(name, mode, dim, case):
        g.stack.zero_grad(set_to_none=True)
        params = None if g.params is None else g.params.clone().requires_grad_(True)
        z_out, log_det = g.stack(g.z, params)
        assert_finite(z_out, log_det, what="forward")
        loss = (torch.randn(z_out.shape, generator=gen, dtype=F64) * z_out).sum() + (
            torch.randn(log_det.shape, generator=gen, dtype=F64) * log_det
        ).sum()
        loss.backward()
        for pname, p in g.stack.named_parameters():
            if p.grad is None:
                assert not require_nonzero, f"parameter {pname} got no gradient"
                continue
            assert torch.isfinite(p.grad).all(), f"parameter {pname}: non-finite gradient"
            if require_nonzero:
                assert (p.grad != 0).any(), f"parameter {pname}: gradient is identically zero"
        if params is not None:
            assert params.grad is not None, "amortised parameters got no gradient"
            assert torch.isfinite(params.grad).all(), "amortised parameters: non-finite gradient"
            if require_nonzero:
                dead = ((params.grad != 0).sum(0) == 0).nonzero().flatten().tolist()
                assert not dead, f"amortised parameter columns {dead} get no gradient"


GRADCHECK_MAX_WEIGHTS = 300  # module weights are included in the gradcheck up to this many


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name, mode):
    """Backward (any hand-written autograd Function included) agrees with finite differences, for
    the inputs, the amortised parameters and the module's weights (when there are few)."""
    gen = generator("gradcheck", name, mode)
    stack = random_stack(name, 3, mode, 2, gen)
    named = dict(stack.named_parameters())
    if sum(w.numel() for w in named.values()) > GRADCHECK_MAX_WEIGHTS:
        named = {}
    keys = list(named)
    z = torch.randn(2, 3, generator=gen, dtype=F64)
    inputs = [z] + [w.detach().clone() for w in named.values()]
    if stack.amortized:
        inputs.append(torch.randn(2, stack.num_params, generator=gen, dtype=F64))
    inputs = tuple(t.requires_grad_(True) for t in inputs)

    def f(*args):
        params = args[-1] if stack.amortized else None
        weights = dict(zip(keys, args[1 : 1 + len(keys)]))
        return torch.func.functional_call(stack, weights, (args[0], params))

    assert torch.autograd.gradcheck(f, inputs)


# -- 4. change of variables end to end ------------------------------------------------------------
DENSITY_K = 8
DENSITY_SCALE = 0.5  # N(0, 0.25/fan_in) weights: 5x planar's init, clearly not the identity
BASE_RADIUS = 8.0  # N(0, I) mass outside this radius in 2-D: exp(-32) ≈ 1.3e-14
GRIDS = (64, 128, 256, 512, 1024)  # cells per side, doubled until the midpoint rule converges
CONVERGED = 2e-4  # |I(2n) - I(n)| at which the quadrature counts as resolved


def integrate_density(stack: FlowStack, lo: Tensor, hi: Tensor, n: int) -> float:
    """Midpoint rule for ∫ q_K over the box [lo, hi] with n x n cells."""
    step = (hi - lo) / n
    axes = [lo[d] + step[d] * (torch.arange(n, dtype=F64) + 0.5) for d in range(2)]
    y = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    z0, log_det = stack.inverse_with_log_det(y)
    log_q = -0.5 * (z0 * z0).sum(1) - math.log(2.0 * math.pi) - log_det
    assert torch.isfinite(log_q).all(), "non-finite density on the grid"
    return (log_q.exp().sum() * step.prod()).item()


@pytest.mark.parametrize("name", NAMES)
def test_change_of_variables_density_integrates_to_one(name):
    """q_K(y) = N(f⁻¹(y); 0, I) exp(-Σ log|det J|) of a random K=8 stack in 2-D integrates to 1.

    The box is the bounding box of the image of the circle ‖z‖ = 8 (f is a homeomorphism, so it
    holds the image of the disc and all but ~1e-14 of the mass). The grid is refined until two
    successive midpoint sums agree to 2e-4, then the sum must be 1 ± 1e-3.
    """
    gen = generator("density", name)
    stack = random_stack(name, 2, "global", DENSITY_K, gen, scale=DENSITY_SCALE)
    with torch.no_grad():
        z = torch.randn(4096, 2, generator=gen, dtype=F64)
        displacement = (stack(z)[0] - z).norm(dim=1).mean().item()
        # a guard against a vacuous test (planar moves points by 0.95 on average, radial by 0.4)
        assert displacement > 0.01, f"the random stack is the identity ({displacement})"

        angle = torch.linspace(0.0, 2.0 * math.pi, 8193, dtype=F64)[:-1]
        rim, _ = stack(BASE_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1))
        lo, hi = rim.amin(0), rim.amax(0)
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

        totals = []
        for n in GRIDS:
            totals.append(integrate_density(stack, lo, hi, n))
            if len(totals) > 1 and abs(totals[-1] - totals[-2]) <= CONVERGED:
                break
        else:
            pytest.fail(f"the midpoint rule did not converge: {totals}")
    assert abs(totals[-1] - 1.0) <= 1e-3, f"∫ q_K = {totals[-1]:.6f} (grids {totals})"


@pytest.mark.parametrize("k", [1, 12])
@pytest.mark.parametrize("name", NAMES)
def test_one_parameter_row_is_shared_by_every_row(name, k):
    """Amortised parameters of shape (1, P) act as that row repeated for every z (the
    importance sampler passes one image's parameters for all its samples this way)."""
    gen = generator("shared", name, k)
    stack = random_stack(name, 5, "amortized", k, gen)
    row = 0.5 * torch.randn(1, stack.num_params, generator=gen, dtype=F64)
    z = torch.randn(7, 5, generator=gen, dtype=F64)
    shared, repeated = stack(z, row), stack(z, row.expand(7, -1).contiguous())
    for a, b in zip(shared, repeated):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- 5. empty stacks and float32 ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_empty_stack_is_identity(name, mode):
    stack = flows.build(name, 5, 0, amortized=mode == "amortized").to(F64)
    assert len(stack) == 0 and stack.num_params == 0
    z = torch.randn(BATCH, 5, generator=generator("k0", name, mode), dtype=F64)
    z_out, log_det = stack(z)
    assert torch.equal(z_out, z)
    assert torch.equal(log_det, torch.zeros(BATCH, dtype=F64))
    assert torch.equal(stack.inverse(z), z)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_float32_matches_float64(name, mode, dim):
    """Same parameters cast: z agrees to 1e-4 relative to each example's ‖z‖∞; log|det| agrees
    to 1e-4 relative with a floor of 1 (an absolute log-det error is a relative density error)."""
    g = make_groups(name, mode, dim, "random")[0]
    z64, ld64 = g.stack(g.z, g.params)
    stack32 = copy.deepcopy(g.stack).to(torch.float32)
    params32 = None if g.params is None else g.params.to(torch.float32)
    z32, ld32 = stack32(g.z.to(torch.float32), params32)
    assert z32.dtype == torch.float32 and ld32.dtype == torch.float32
    z_err = ((z32.double() - z64).abs().amax(1) / z64.abs().amax(1)).max().item()
    assert z_err <= F32_RTOL, f"z: relative error {z_err:.2e}"
    ld_err = scaled_error(ld32.double(), ld64)
    assert ld_err <= F32_RTOL, f"log_det: relative error {ld_err:.2e}"


# -- 6. registry ----------------------------------------------------------------------------------
def test_unknown_flow_suggests_closest_name():
    with pytest.raises(KeyError) as info:
        flows.get("plannar")
    choices = ", ".join(sorted(flows.available()))
    expected = f"unknown flow 'plannar' — did you mean 'planar'? (choices: {choices})"
    assert str(info.value) == expected


def test_build_rejects_unknown_option():
    with pytest.raises(ValueError, match="'foo'"):
        flows.build("planar", 2, 3, foo=1)


def test_available_is_sorted_and_complete():
    names = flows.available()
    assert names == sorted(names)
    assert {"planar", "radial"} <= set(names)
    for name in names:
        assert issubclass(flows.get(name), flows.Flow)


# -- 7. import hygiene ----------------------------------------------------------------------------
def test_flows_import_does_not_pull_in_cli():
    code = (
        "import sys\n"
        "from flowvae.flows import build\n"
        "assert 'flowvae.cli' not in sys.modules, sorted(m for m in sys.modules if 'flowvae' in m)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# -- 8. dtype and device --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_outputs_keep_input_dtype(name, mode, dtype):
    g = make_groups(name, mode, 5, "random")[0]
    stack = g.stack.to(dtype)
    params = None if g.params is None else g.params.to(dtype)
    z = g.z.to(dtype)
    z_out, log_det = stack(z, params)
    z_back = stack.inverse(z_out, params)
    z_s, log_det_s = stack.inverse_with_log_det(z_out, params)
    outputs = [z_out, log_det, z_back, z_s, log_det_s]
    for layer, chunk in zip(stack.layers, stack.split(params)):  # the stack's sum could promote
        outputs += [*layer(z, chunk), layer.inverse(z, chunk)]
    for t in outputs:
        assert t.dtype == dtype


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_allocates_nothing_off_device(name, mode):
    """Forward on the meta device: any tensor the layer creates on the CPU would clash."""
    g = make_groups(name, mode, 5, "random")[0]
    stack = g.stack.to("meta")
    params = None if g.params is None else g.params.to("meta")
    z_out, log_det = stack(g.z.to("meta"), params)
    assert z_out.device.type == "meta" and log_det.device.type == "meta"
    assert z_out.shape == g.z.shape and log_det.shape == (g.z.shape[0],)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_forward_inverse(name, mode, dtype):
    g = make_groups(name, mode, 5, "random")[0]
    z_cpu, ld_cpu = g.stack(g.z, g.params)
    dev = torch.device("cuda")
    stack = copy.deepcopy(g.stack).to(device=dev, dtype=dtype)
    params = None if g.params is None else g.params.to(device=dev, dtype=dtype)
    z_out, log_det = stack(g.z.to(device=dev, dtype=dtype), params)
    z_back = stack.inverse(z_out, params)
    for t in (z_out, log_det, z_back):
        assert t.device.type == "cuda" and t.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert_close_scaled(z_out.double().cpu(), z_cpu, tol, "cuda forward z")
    assert_close_scaled(log_det.double().cpu(), ld_cpu, tol, "cuda forward log-det")
    assert_close_scaled(z_back.double().cpu(), g.z, 10 * tol, "cuda inverse")
