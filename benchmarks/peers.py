#!/usr/bin/env python
"""flowvae's planar and radial stacks against pyro's and normflows' layers (`make bench-peers`).

For each case the peer's layers and flowvae's stack are set to the SAME map, checked identical in
float64 (outputs, log-dets, and the gradients with respect to z and to the peer's parameters),
then forward + backward is timed in float32 on one thread, in alternating blocks (A B B A ...,
run.py's ``interleaved``), median over blocks.

How the maps are made identical. The peers use the paper's parameterisation: planar
û = u + (m(wᵀu) - wᵀu) w/‖w‖² with m(x) = -1 + softplus(x) and a free offset b; radial
α = softplus(α'), β = -α + softplus(β') (pyro) or α = |α|, β = softplus(β) - |α| (normflows).
flowvae's defaults differ only in parameterisation (planar: offset b = ‖w‖·b̃ and
m(x) = -1 + softplus(x) + 1e-3; radial: α = softplus(α') + 1e-6, α + β = softplus(β') + 1e-6),
so each peer's parameters are mapped across, differentiably:

    planar  u' = u + (x' - wᵀu) w/‖w‖²,  x' = softplus⁻¹(softplus(wᵀu) - 1e-3),  b̃ = b/‖w‖
    radial  α'_f = softplus⁻¹(α - 1e-6),  β'_f = softplus⁻¹((α + β) - 1e-6)

(defined where softplus(wᵀu) > 1e-3, i.e. wᵀu > -6.9, and α, α + β > 1e-6: flowvae's margins
exclude the nearly singular rest, which the random parameters here never reach)

which gives flowvae the same û (wᵀû' = m(wᵀu)), pre-activation and log-det. The check pulls
flowvae's parameter gradients back through the mapping (chain rule, autograd) to compare them
with the peer's. The timed flowvae stack gets the mapped parameters as its own leaves.

    python benchmarks/peers.py                    # ~2 minutes; needs pyro-ppl and normflows
    python benchmarks/peers.py --seconds 2        # quicker, noisier
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flowvae import flows  # noqa: E402
from flowvae.flows.planar import SLACK as PLANAR_SLACK  # noqa: E402
from flowvae.flows.radial import SLACK as RADIAL_SLACK  # noqa: E402

#: Relative tolerance of the float64 equivalence check (max |difference| / max |peer value|).
RTOL = 1e-10


@dataclass(frozen=True)
class Case:
    family: str  # planar | radial
    amortized: bool
    k: int
    batch: int
    dim: int

    @property
    def name(self) -> str:
        kind = "amortised" if self.amortized else "global"
        return f"{self.family} {kind} K={self.k} (B={self.batch}, D={self.dim})"

    @property
    def width(self) -> int:
        """Parameters per layer: planar [u, w, b], radial [z0, α', β']."""
        return 2 * self.dim + 1 if self.family == "planar" else self.dim + 2


CASES = [
    Case("planar", True, 10, 100, 40),
    Case("planar", True, 80, 100, 40),
    Case("planar", False, 32, 512, 2),
    Case("radial", True, 10, 100, 40),
    Case("radial", True, 80, 100, 40),
    Case("radial", False, 32, 512, 2),
]


# -- the parameter mappings ---------------------------------------------------------------------


def softplus_inv(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y > 0, without overflow: y + log(1 - e^-y)."""
    return y + torch.log(-torch.expm1(-y))


def planar_to_flowvae(u, w, b):
    """flowvae's (u', w, b̃) for the peer's planar (u, w, b), each (P, ·)."""
    wu = (w * u).sum(-1, keepdim=True)
    w_sq = (w * w).sum(-1, keepdim=True)
    target = softplus_inv(F.softplus(wu) - PLANAR_SLACK)
    return u + (target - wu) / w_sq * w, w, b / w_sq.sqrt()


def radial_to_flowvae(z0, alpha, s):
    """flowvae's (z0, α', β') for a radial layer with α > 0 and s = α + β > 0, each (P, ·)."""
    return z0, softplus_inv(alpha - RADIAL_SLACK), softplus_inv(s - RADIAL_SLACK)


# -- the implementations ------------------------------------------------------------------------


@dataclass
class Model:
    """A stack under test: ``run(z) -> (y, log_det)``; gradients are taken w.r.t. ``leaves``."""

    leaves: list[torch.Tensor]
    run: object
    #: Per layer, the parameters in flowvae's order as differentiable functions of ``leaves``,
    #: already mapped to flowvae's parameterisation (peers only).
    mapped: list[tuple[torch.Tensor, ...]] | None = None


def random_params(case: Case, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Per-layer raw parameters (P, K, width) of a realistic size; P = B or 1."""
    gen = torch.Generator().manual_seed(seed)
    rows = case.batch if case.amortized else 1
    raw = torch.randn(rows, case.k, case.width, generator=gen, dtype=torch.float64)
    d = case.dim
    if case.family == "planar":
        raw[..., : 2 * d] /= d**0.5  # u, w: wᵀu of order one
    else:
        raw[..., d:] *= 0.5  # α', β'
    return raw.to(dtype)


def pyro_planar(case: Case, raw: torch.Tensor) -> Model:
    from pyro.distributions.transforms.planar import ConditionedPlanar, Planar

    d = case.dim
    if case.amortized:
        leaf = raw.clone().requires_grad_()

        def run(z):
            # Conditioning is part of every step (the hypernet's output changes), as in a VAE.
            parts = [(leaf[:, k, 2 * d :], leaf[:, k, :d], leaf[:, k, d : 2 * d]) for k in range(case.k)]  # fmt: skip
            return _pyro_chain([ConditionedPlanar(p) for p in parts], z)

        mapped = [(leaf[:, k, :d], leaf[:, k, d : 2 * d], leaf[:, k, 2 * d :]) for k in range(case.k)]  # fmt: skip
        return Model([leaf], run, mapped)
    layers = []
    for k in range(case.k):
        layer = Planar(d).to(raw.dtype)
        with torch.no_grad():
            layer.u.copy_(raw[0, k, :d])
            layer.w.copy_(raw[0, k, d : 2 * d])
            layer.bias.copy_(raw[0, k, 2 * d :])
        layers.append(layer)
    leaves = [p for layer in layers for p in (layer.u, layer.w, layer.bias)]
    mapped = [(x.u[None], x.w[None], x.bias[None]) for x in layers]
    return Model(leaves, lambda z: _pyro_chain(layers, z), mapped)


def pyro_radial(case: Case, raw: torch.Tensor) -> Model:
    from pyro.distributions.transforms.radial import ConditionedRadial, Radial

    d = case.dim
    if case.amortized:
        leaf = raw.clone().requires_grad_()

        def run(z):
            parts = [(leaf[:, k, :d], leaf[:, k, d : d + 1], leaf[:, k, d + 1 :]) for k in range(case.k)]  # fmt: skip
            return _pyro_chain([ConditionedRadial(p) for p in parts], z)

        return Model([leaf], run, [(leaf[:, k, :d], leaf[:, k, d : d + 1], leaf[:, k, d + 1 :])
                                   for k in range(case.k)])  # fmt: skip
    layers = []
    for k in range(case.k):
        layer = Radial(d).to(raw.dtype)
        with torch.no_grad():
            layer.x0.copy_(raw[0, k, :d])
            layer.alpha_prime.copy_(raw[0, k, d : d + 1])
            layer.beta_prime.copy_(raw[0, k, d + 1 :])
        layers.append(layer)
    leaves = [p for x in layers for p in (x.x0, x.alpha_prime, x.beta_prime)]
    mapped = [(x.x0[None], x.alpha_prime[None], x.beta_prime[None]) for x in layers]
    return Model(leaves, lambda z: _pyro_chain(layers, z), mapped)


def _pyro_chain(layers, z):
    log_det = 0.0
    for t in layers:
        y = t(z)
        log_det = log_det + t.log_abs_det_jacobian(z, y)
        z = y
    return z, log_det


def normflows_planar(case: Case, raw: torch.Tensor) -> Model:
    import normflows

    d = case.dim
    layers = [
        normflows.flows.Planar((d,), u=raw[:, k, :d].clone(), w=raw[:, k, d : 2 * d].clone(),
                               b=raw[0, k, 2 * d :].clone())
        for k in range(case.k)
    ]  # fmt: skip
    leaves = [p for x in layers for p in (x.u, x.w, x.b)]
    mapped = [(x.u, x.w, x.b[None]) for x in layers]
    return Model(leaves, lambda z: _normflows_chain(layers, z), mapped)


def normflows_radial(case: Case, raw: torch.Tensor) -> Model:
    import normflows

    d = case.dim
    layers = []
    for k in range(case.k):
        layer = normflows.flows.Radial((d,), z_0=raw[:, k, :d].clone()).to(raw.dtype)
        with torch.no_grad():
            # normflows' α = |alpha|, α + β = softplus(beta): set them to pyro's values.
            layer.alpha.copy_(F.softplus(raw[0, k, d : d + 1]))
            layer.beta.copy_(raw[0, k, d + 1 :])
        layers.append(layer)
    leaves = [p for x in layers for p in (x.z_0, x.alpha, x.beta)]
    mapped = [(x.z_0, x.alpha.abs()[None], F.softplus(x.beta)[None]) for x in layers]
    return Model(leaves, lambda z: _normflows_chain(layers, z), mapped)


def _normflows_chain(layers, z):
    log_det = 0.0
    for f in layers:
        z, ld = f(z)
        log_det = log_det + ld
    return z, log_det


def to_flowvae_layer(family: str, layer: tuple, peer: str) -> tuple[torch.Tensor, ...]:
    """One layer's peer parameters (as ``Model.mapped`` gives them) in flowvae's terms."""
    if family == "planar":
        return planar_to_flowvae(*layer)
    if peer == "pyro":  # (x0, α', β'): α = softplus(α'), α + β = softplus(β')
        z0, a, b = layer
        return radial_to_flowvae(z0, F.softplus(a), F.softplus(b))
    return radial_to_flowvae(*layer)  # normflows: mapped already gives (z0, α, α + β)


def flowvae_model(case: Case, layers: list[tuple[torch.Tensor, ...]]) -> Model:
    """flowvae's stack with the given per-layer parameters (values only) as its own leaves."""
    stack = flows.build(case.family, dim=case.dim, k=case.k, amortized=case.amortized)
    dtype = layers[0][0].dtype
    stack = stack.to(dtype)
    if case.amortized:
        flat = torch.cat([torch.cat(x, -1) for x in layers], -1).detach().requires_grad_()
        return Model([flat], lambda z: stack(z, flat))
    with torch.no_grad():
        for layer, values in zip(stack.layers, layers, strict=True):
            for p, v in zip(layer.parameters(), values, strict=True):
                p.copy_(v.reshape(p.shape))
    return Model(list(stack.parameters()), lambda z: stack(z))


PEERS = {
    "planar": {"pyro": pyro_planar, "normflows": normflows_planar},
    "radial": {"pyro": pyro_radial, "normflows": normflows_radial},
}


def peers_for(case: Case) -> list[str]:
    """normflows' layers are global only."""
    return [p for p in PEERS[case.family] if case.amortized is False or p == "pyro"]


# -- the equivalence check ----------------------------------------------------------------------


def values_and_grads(model: Model, z: torch.Tensor, gy, gld):
    z = z.clone().requires_grad_()
    y, ld = model.run(z)
    grads = torch.autograd.grad((y * gy).sum() + (ld * gld).sum(), [z, *model.leaves])
    return y, ld, grads


def check(case: Case, peer: str) -> dict:
    """Max relative differences flowvae vs peer, float64: outputs, log-dets, ∂/∂z, ∂/∂params."""
    raw = random_params(case, torch.float64, seed=1)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(case.batch, case.dim, generator=gen, dtype=torch.float64)
    gy = torch.randn(case.batch, case.dim, generator=gen, dtype=torch.float64)
    gld = torch.randn(case.batch, generator=gen, dtype=torch.float64)
    theirs = PEERS[case.family][peer](case, raw)
    y_p, ld_p, g_p = values_and_grads(theirs, z, gy, gld)
    mapped = [to_flowvae_layer(case.family, layer, peer) for layer in theirs.mapped]
    ours = flowvae_model(case, mapped)
    y_f, ld_f, g_f = values_and_grads(ours, z, gy, gld)
    # flowvae's parameter gradients pulled back through the mapping to the peer's parameters.
    if case.amortized:
        outs = [torch.cat([torch.cat(x, -1) for x in mapped], -1)]
    else:
        outs = [t for layer in mapped for t in layer]
        g_f = (g_f[0], *(g.reshape(o.shape) for g, o in zip(g_f[1:], outs, strict=True)))
    g_back = torch.autograd.grad(outs, theirs.leaves, g_f[1:], allow_unused=True)
    g_back = [torch.zeros_like(x) if g is None else g for g, x in zip(g_back, theirs.leaves)]
    return {
        "output": rel_diff(y_f, y_p),
        "log_det": rel_diff(ld_f, ld_p),
        "grad_z": rel_diff(g_f[0], g_p[0]),
        "grad_params": rel_diff(torch.cat([g.flatten() for g in g_back]),
                                torch.cat([g.flatten() for g in g_p[1:]])),
    }  # fmt: skip


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach(), ref.detach()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


# -- timing -------------------------------------------------------------------------------------


def step_fn(model: Model, z: torch.Tensor):
    """Forward + backward: loss = Σ outputs + Σ log-dets, gradients to z and the parameters."""

    def step():
        # A new z each call, as with fresh samples: pyro's transforms cache their last input.
        x = z.clone().requires_grad_()
        y, ld = model.run(x)
        torch.autograd.grad(y.sum() + ld.sum(), [x, *model.leaves])

    return step


def time_case(case: Case, seconds: float, rounds: int) -> dict:
    from run import interleaved

    raw = random_params(case, torch.float32, seed=1)
    z = torch.randn(case.batch, case.dim, generator=torch.Generator().manual_seed(2))
    fns = {}
    mapped = None
    for peer in peers_for(case):
        model = PEERS[case.family][peer](case, raw)
        fns[peer] = step_fn(model, z)
        if mapped is None:
            with torch.no_grad():
                mapped = [to_flowvae_layer(case.family, x, peer) for x in model.mapped]
    fns = {"flowvae": step_fn(flowvae_model(case, mapped), z), **fns}
    return interleaved(fns, seconds, rounds, warmup=5, sync=lambda: None)


# -- report -------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name, module in (("pyro-ppl", "pyro"), ("normflows", "normflows")):
        out[name] = __import__(module).__version__
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# flowvae's flow layers against pyro and normflows",
        "",
        f"{meta['when']}, `{meta['command']}`, {meta['machine']}, revision {meta['revision']}, "
        "one thread, "
        f"torch {meta['versions']['torch']}, pyro-ppl {meta['versions']['pyro-ppl']}, "
        f"normflows {meta['versions']['normflows']}. Load average (1 min) "
        f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after.",
        "",
        "Forward + backward (loss = Σ outputs + Σ log-dets, gradients to z and the parameters), "
        "float32, median ms over alternating blocks (range); speed = peer time / flowvae time. "
        f"Equivalence checked in float64 first: max relative difference of outputs, log-dets, "
        f"∂/∂z, ∂/∂params (tolerance {RTOL:g}).",
        "",
        "| case | peer | flowvae ms | peer ms | flowvae speed / peer | max rel. diff (out, ld, ∂z, ∂θ) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        f = row["times"]["flowvae"]
        for peer, diffs in row["checks"].items():
            p = row["times"][peer]
            d = ", ".join(
                f"{diffs[key]:.1e}" for key in ("output", "log_det", "grad_z", "grad_params")
            )
            lines.append(
                f"| {row['case']} | {peer} | {1e3 * f['median_s']:.3f} "
                f"({1e3 * f['min_s']:.3f}–{1e3 * f['max_s']:.3f}) | {1e3 * p['median_s']:.3f} "
                f"({1e3 * p['min_s']:.3f}–{1e3 * p['max_s']:.3f}) | "
                f"**{p['median_s'] / f['median_s']:.1f}×** | {d} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="timing per case, all blocks")
    ap.add_argument("--rounds", type=int, default=12, help="alternating blocks per implementation")
    ap.add_argument("--cases", default="all", help="comma-separated indices into the case list")
    ap.add_argument("--out", default=str(HERE / "results-peers.md"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    load_before = os.getloadavg()[0]
    rows, failed = [], []
    for case in cases:
        checks = {peer: check(case, peer) for peer in peers_for(case)}
        for peer, diffs in checks.items():
            if not max(diffs.values()) <= RTOL:  # NaN fails too
                failed.append(f"{case.name} vs {peer}: {diffs}")
        rows.append({"case": case.name, "checks": checks,
                     "times": time_case(case, args.seconds, args.rounds)})  # fmt: skip
        print(f"done: {case.name}", file=sys.stderr, flush=True)
    from run import git_revision

    meta = {
        "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/peers.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "revision": git_revision(),
        "versions": versions(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    text = markdown(rows, meta)
    Path(args.out).write_text(text)
    print(text)
    for line in failed:
        print(f"peers: maps differ beyond {RTOL:g}: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
