"""benchmarks/peers.py maps the peers' (paper's) planar and radial parameters to flowvae's so that
the maps are identical. Without pyro or normflows installed, check the mappings against the
paper's parameterisation written out here: flowvae's stack with the mapped parameters must give
the same outputs and log-dets in float64."""

import importlib.util
import sys

import torch
import torch.nn.functional as F

from flowvae import flows


def _peers(repo_root):
    name = "flowvae_bench_peers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, repo_root / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _paper_planar(z, u, w, b):
    """Rezende & Mohamed's planar layer (as pyro and normflows write it)."""
    wu = (w * u).sum(-1, keepdim=True)
    u_hat = u + (-1.0 + F.softplus(wu) - wu) * w / (w * w).sum(-1, keepdim=True)
    t = torch.tanh((w * z).sum(-1, keepdim=True) + b)
    log_det = torch.log(torch.abs(1.0 + ((1.0 - t * t) * w * u_hat).sum(-1)))
    return z + u_hat * t, log_det


def _paper_radial(z, z0, alpha_raw, beta_raw):
    """The radial layer as pyro writes it: α = softplus(α'), β = -α + softplus(β')."""
    alpha = F.softplus(alpha_raw)
    beta = -alpha + F.softplus(beta_raw)
    diff = z - z0
    r = diff.norm(dim=-1, keepdim=True)
    h = 1.0 / (alpha + r)
    log_det = (z.shape[-1] - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * h * h * r)
    return z + beta * h * diff, log_det[:, 0]


def _run_both(family, peers, z, layers, paper):
    ref_z, ref_ld = z, torch.zeros(z.shape[0], dtype=z.dtype)
    for layer in layers:
        ref_z, ld = paper(ref_z, *layer)
        ref_ld = ref_ld + ld
    mapped = [peers.to_flowvae_layer(family, layer, "pyro") for layer in layers]
    stack = flows.build(family, z.shape[1], len(layers), amortized=True).double()
    y, log_det = stack(z, torch.cat([torch.cat(m, -1) for m in mapped], -1))
    torch.testing.assert_close(y, ref_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_det, ref_ld, rtol=1e-12, atol=1e-12)


def test_planar_mapping_gives_the_papers_map(repo_root):
    peers = _peers(repo_root)
    gen = torch.Generator().manual_seed(0)
    batch, dim, k = 7, 5, 6
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    layers = []
    for _ in range(k):
        # wᵀu of order one: flowvae's slack needs softplus(wᵀu) > 1e-3 for the same û.
        u, w = torch.randn(2, batch, dim, generator=gen, dtype=torch.float64) / dim**0.5
        layers.append((u, w, torch.randn(batch, 1, generator=gen, dtype=torch.float64)))
    _run_both("planar", peers, z, layers, _paper_planar)


def test_radial_mapping_gives_the_papers_map(repo_root):
    peers = _peers(repo_root)
    gen = torch.Generator().manual_seed(1)
    batch, dim, k = 7, 4, 6
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    layers = [
        (
            torch.randn(batch, dim, generator=gen, dtype=torch.float64),
            torch.randn(batch, 1, generator=gen, dtype=torch.float64),
            torch.randn(batch, 1, generator=gen, dtype=torch.float64),
        )
        for _ in range(k)
    ]
    _run_both("radial", peers, z, layers, _paper_radial)
