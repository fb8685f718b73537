"""Where a flowvae training step spends its time: torch.profiler over a few steps per K.

    python benchmarks/profile_step.py --ks 0,10,80 --data-root ../shared/data/mnist

Prints, per K, the step time and the milliseconds per step of the op groups that matter for
the flow overhead (matrix products, maxout, Adam, the planar stack), the encoder's flow-parameter
head timed alone, then the top ops.
The steps are those timed by benchmarks/run.py (same config, same loop body).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

#: Op groups reported per step: name -> profiler keys summed (self CPU time).
GROUPS = {
    "matrix products (mm, addmm)": ("aten::mm", "aten::addmm"),
    "maxout (max_pool1d) forward": ("aten::max_pool2d_with_indices",),
    "Adam (fused)": ("aten::_fused_adam_",),
}
#: Total CPU time (own ops included) of the planar stack's forward and backward nodes.
STACK = ("PlanarStackFunction", "PlanarStackFunctionBackward")


def head_ms(k: int, batch: int = 100, hidden: int = 400, repeats: int = 50) -> float:
    """Milliseconds for the flow-parameter head's three matrix products alone (forward, and the
    backward's input and weight gradients) at this batch: the floor under any amortised flow."""
    x = torch.randn(batch, hidden)
    weight = torch.randn(81 * k, hidden)
    grad = torch.randn(batch, 81 * k)

    def products():
        x @ weight.t()
        grad @ weight
        grad.t() @ x

    for _ in range(5):
        products()
    start = time.perf_counter()
    for _ in range(repeats):
        products()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=bench.int_list, default=[0, 10, 80])
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per K")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default=bench.default_data_root())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=15, help="top ops listed per K (0: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    for k in args.ks:
        _, step = bench.flowvae_training(bench.vae_config(k, args, device), device)
        for _ in range(args.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        stats = {e.key: e for e in prof.key_averages()}
        total = sum(e.self_cpu_time_total for e in stats.values())
        ms = 1e-3 / args.steps
        print(f"K = {k}: {total * ms:.1f} ms per step (profiled, {args.threads} thread(s))")
        for name, keys in GROUPS.items():
            own = sum(stats[key].self_cpu_time_total for key in keys if key in stats)
            print(f"  {name:32s} {own * ms:6.2f} ms")
        if k:
            flow = sum(stats[key].cpu_time_total for key in STACK if key in stats)
            print(f"  {'planar stack forward + backward':32s} {flow * ms:6.2f} ms")
            print(f"  {'head products alone (unprofiled)':32s} {head_ms(k):6.2f} ms")
        if args.top:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
