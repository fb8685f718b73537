"""The benchmark's floor (benchmarks/floor.py): the products it records from a real training step
are exactly the step's Linear GEMMs, counted by hand from the architecture."""

import sys

import pytest
import torch


@pytest.fixture(scope="module")
def bench(repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        import floor
        import run
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))
    return run, floor


def hand_count(k: int, batch: int = 100) -> int:
    """GEMM FLOPs of one step of the benchmark's VAE: maxout 784-400-400 / 40-400-400-784
    (4 pieces), heads μ and σ (400 -> 40) and the flow head (400 -> 81 K). Each product is
    2 · rows · in · out FLOPs, three times (forward, input gradient, weight gradient) except the
    first layer's, whose input (the images) needs no gradient."""
    layers = [(400, 1600), (400, 40), (400, 40), (40, 1600), (400, 1600), (400, 784)]
    if k:
        layers.append((400, 81 * k))
    flops = 2 * batch * 784 * 1600 * 2
    return flops + sum(2 * batch * n_in * n_out * 3 for n_in, n_out in layers)


@pytest.mark.parametrize("k", [0, 10])
def test_the_floor_counts_the_steps_products(bench, mnist_dir, k):
    run, floor = bench
    args = type("Args", (), {"data_root": str(mnist_dir), "seed": 0})()
    cpu = torch.device("cpu")
    trainer = run.flowvae_trainer(run.vae_config(k, args, cpu), cpu)
    fns, products = floor.floor_fns(trainer, lambda: run.train_step(trainer, 0))
    assert sum(p.flops for p in products) == hand_count(k)
    assert [p.input_grad for p in products].count(False) == 1  # the encoder's first layer
    before = trainer.model.mu.weight.detach().clone()
    fns["floor"]()  # every product once, then the optimiser step: the weights move
    assert not torch.equal(before, trainer.model.mu.weight)
