"""Where a flowvae training step spends its time: torch.profiler over a few steps per K.

    python benchmarks/profile_step.py --ks 0,10,80 --data-root ../shared/data/mnist

Prints a Markdown table, milliseconds per step for each K, of what the step does: matrix
products, maxout, drawing the batch and the noise, the loss, the flow layers, the gradient norm
and non-finite check, the optimiser, other small tensor ops, the autograd engine's and
dispatcher's own records, and the Python time between ops. Each profiled op is counted once, in
the group of its nearest enclosing record that names one (the ops inside the planar stack's
autograd node count as the flow, those inside the optimiser's step as the optimiser). The
profiler slows small ops down, so the table also gives the step unprofiled. With --top N the
N most expensive ops follow. The steps are those timed by benchmarks/run.py (same config, same
loop body).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

#: Records whose whole subtree is one group (checked from the op up through its parents).
SUBTREES = {
    "PlanarStackFunction": "flow layers (planar stack, forward + backward)",
    "PlanarStackFunctionBackward": "flow layers (planar stack, forward + backward)",
    "Optimizer.step#Adam.step": "optimiser (fused Adam, zero_grad)",
    "Optimizer.zero_grad#Adam.zero_grad": "optimiser (fused Adam, zero_grad)",
    "aten::_foreach_norm": "gradient norm and non-finite check",
    "aten::binary_cross_entropy_with_logits": "loss (Bernoulli log-likelihood, KL terms)",
    "BinaryCrossEntropyWithLogitsBackward0": "loss (Bernoulli log-likelihood, KL terms)",
    "aten::max_pool1d": "maxout (max over 4 pieces, forward + backward)",
    "MaxPool2DWithIndicesBackward0": "maxout (max over 4 pieces, forward + backward)",
    "WindowMax": "maxout (max over 4 pieces, forward + backward)",
    "WindowMaxBackward": "maxout (max over 4 pieces, forward + backward)",
}
#: Ops outside those subtrees, by name.
OPS = {
    "aten::mm": "matrix products (mm, addmm)",
    "aten::addmm": "matrix products (mm, addmm)",
    "aten::bernoulli_": "batch and noise (index, binarise, randn)",
    "aten::index": "batch and noise (index, binarise, randn)",
    "aten::index_select": "batch and noise (index, binarise, randn)",
    "aten::uniform_": "batch and noise (index, binarise, randn)",
    "aten::lt_": "batch and noise (index, binarise, randn)",
    "aten::randint": "batch and noise (index, binarise, randn)",
    "aten::random_": "batch and noise (index, binarise, randn)",
    "aten::normal_": "batch and noise (index, binarise, randn)",
    "aten::linalg_vector_norm": "gradient norm and non-finite check",
    "aten::isfinite": "gradient norm and non-finite check",
    "aten::_local_scalar_dense": "gradient norm and non-finite check",
    "aten::softplus": "loss (Bernoulli log-likelihood, KL terms)",
    "aten::softplus_backward": "loss (Bernoulli log-likelihood, KL terms)",
    "aten::log_sigmoid_forward": "loss (Bernoulli log-likelihood, KL terms)",
}
OTHER_OPS = "other tensor ops (adds, sums, views, copies)"
BOOKKEEPING = "autograd engine and dispatcher records"
PYTHON = "Python between ops (profiled wall time - all ops)"
ORDER = [
    "matrix products (mm, addmm)",
    "optimiser (fused Adam, zero_grad)",
    "maxout (max over 4 pieces, forward + backward)",
    "batch and noise (index, binarise, randn)",
    "loss (Bernoulli log-likelihood, KL terms)",
    "flow layers (planar stack, forward + backward)",
    "gradient norm and non-finite check",
    OTHER_OPS,
    BOOKKEEPING,
    PYTHON,
]


def group_of(event) -> str:
    """The group an op's self time counts in: its nearest enclosing subtree, else its name."""
    node = event
    while node is not None:
        if node.name in SUBTREES:
            return SUBTREES[node.name]
        node = node.cpu_parent
    if event.name in OPS:
        return OPS[event.name]
    return OTHER_OPS if event.name.startswith("aten::") else BOOKKEEPING


def profile_steps(step, steps: int):
    """Milliseconds per step by group, the profiled wall time per step, and the profile."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps * 1e3
    groups: Counter = Counter()
    for event in prof.events():
        groups[group_of(event)] += event.self_cpu_time_total / 1e3 / steps
    groups[PYTHON] = max(0.0, wall - sum(groups.values()))
    return groups, wall, prof


def unprofiled_ms(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def table(ks: list[int], groups: dict, walls: dict, plain: dict) -> str:
    head = ["", *(f"K = {k}" for k in ks)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(ks)]
    for name in ORDER:
        cells = [f"{groups[k][name]:.2f} ({groups[k][name] / walls[k]:.0%})" for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **step, profiled** | " + " | ".join(f"{walls[k]:.1f}" for k in ks) + " |")
    lines.append("| **step, unprofiled** | " + " | ".join(f"{plain[k]:.1f}" for k in ks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=bench.int_list, default=[0, 10, 80])
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per K")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default=bench.default_data_root())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=0, help="top ops listed per K (0: none)")
    parser.add_argument("--out", default=None, help="also write the table, dated, to this .md")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    groups, walls, plain = {}, {}, {}
    for k in args.ks:
        _, step = bench.flowvae_training(bench.vae_config(k, args, device), device)
        for _ in range(args.warmup):
            step()
        plain[k] = unprofiled_ms(step, args.steps)
        groups[k], walls[k], prof = profile_steps(step, args.steps)
        if args.top:
            averages = prof.key_averages()
            print(f"K = {k}")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
    text = (
        f"Milliseconds per step (share of the profiled step), {args.threads} thread(s):\n\n"
        + table(args.ks, groups, walls, plain)
    )
    print(text)
    if args.out:
        command = " ".join(["python benchmarks/profile_step.py", *(argv or sys.argv[1:])])
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = (
            f"{when}, `{command}`, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, revision {bench.git_revision()}; load average (1 min) "
            f"{load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after."
        )
        Path(args.out).write_text(f"# Where a training step's time goes\n\n{head}\n\n{text}\n")


if __name__ == "__main__":
    main()
