#!/usr/bin/env python
"""Time flowvae's hot paths against a plain PyTorch baseline (benchmarks/baseline.py).

In one process on one machine, for each item, flowvae's code (A) and the baseline (B) are warmed
up, then timed in alternating blocks (A B B A A B ...) so that drift in the machine's speed falls
on both alike; the per-unit time of each block is recorded and the median is reported, with the
range over blocks. Items:

1. VAE training step on MNIST for each K (--ks): the library's own ``flowvae.train.train_step``
   (the loss, backward, gradient norm, the non-finite guard, optimizer and schedule steps), as
   the training loop calls it, against ``baseline.make_baseline_step``.
2. Importance-sampled -log p(x) for planar K=10 at S samples (--iw-samples): one chunk of
   `flowvae eval` (``sharded_importance_nll``: max_rows // S images under
   torch.inference_mode) against a for-loop over images with S samples each and logsumexp.
3. Density matching, U1, planar K=32, 512 samples per step, one CPU thread (what flowvae.train
   uses for density runs): flowvae's DensityExperiment against a plain planar density fit.

Peak memory of each item and implementation is measured in a fresh subprocess, after one
untimed call: on CPU the growth of the resident set over a few steps (VmHWM, reset through /proc/self/clear_refs, minus
VmRSS before the first step; glibc is told to mmap every allocation of 64 KiB or more, so freed
tensors leave the resident set instead of being reused from the heap left by data loading), on
CUDA torch.cuda.max_memory_allocated minus the memory allocated before the first step. That is
a step's working memory, activations and temporaries; the weights, the optimiser state, the data
and the gradients left by the untimed call are resident before it.

    python benchmarks/run.py                      # full run (~20 s per item per default)
    python benchmarks/run.py --quick --ks 0,10    # smoke test, well under two minutes
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import baseline as bl  # noqa: E402
import floor  # noqa: E402
import torch  # noqa: E402

from flowvae.config import load_config  # noqa: E402
from flowvae.importance import MAX_ROWS, sharded_importance_nll  # noqa: E402
from flowvae.run_folder import cpu_model  # noqa: E402
from flowvae.train import build_trainer, train_step, wrap_model  # noqa: E402

IW_K = 10  # planar depth of the evaluation benchmark
DENSITY_K, DENSITY_BATCH = 32, 512


# -- options ------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def default_data_root() -> str:
    return os.environ.get("FLOWVAE_DATA") or str(REPO.parent / "shared" / "data" / "mnist")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke test, not numbers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--ks", type=int_list, default=[0, 10, 40, 80], help="VAE flow depths")
    p.add_argument(
        "--compile-ks",
        type=lambda t: [] if t.strip() in ("", "none") else int_list(t),
        default=[0, 10, 80],
        help="also time flowvae with train.compile: true at these K ('none' to skip)",
    )
    p.add_argument(
        "--head-only-ks",
        type=lambda t: [] if t.strip() in ("", "none") else int_list(t),
        default=[10, 80],
        help="also time flowvae at these K with the flow layers skipped but the encoder's "
        "flow-parameter head computed and backpropagated: the floor any flow code sits on",
    )
    p.add_argument("--iw-samples", type=int_list, default=[200, 5000], help="S for -log p(x)")
    p.add_argument(
        "--seconds-per-item",
        type=float,
        default=None,
        help="timed seconds per item, both implementations together (default 20, quick 1)",
    )
    p.add_argument("--rounds", type=int, default=None, help="timed blocks per implementation")
    p.add_argument("--iw-images", type=int, default=1000, help="test images cycled through")
    p.add_argument(
        "--eval-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads for the whole-test-set evaluation (default: all cores)",
    )
    p.add_argument("--no-full-eval", action="store_true", help="skip the whole-test-set eval")
    p.add_argument("--data-root", default=default_data_root(), help="folder with MNIST IDX files")
    p.add_argument("--out", default=str(HERE / "results.md"), help=".md or .json")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the floor (the step's matrix products and optimiser step alone, per K)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seconds_per_item is None:
        args.seconds_per_item = 1.0 if args.quick else 20.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 6
    args.warmup = 1 if args.quick else 5
    args.probe_steps = 2 if args.quick else 10
    return args


def syncer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the code under test ------------------------------------------------------------------------


def vae_config(k: int, args, device: torch.device, compile: bool = False):
    return load_config(
        REPO / "configs" / "mnist_quick.yaml",
        [
            "model.hidden=[400,400]",
            f"flow.k={k}",
            "train.batch_size=100",
            f"data.root={args.data_root}",
            "data.download=false",
            f"device={device.type}",
            f"seed={args.seed}",
            f"train.compile={str(compile).lower()}",
        ],
    )


def density_config(args, device: torch.device):
    return load_config(
        REPO / "configs" / "energy.yaml",
        [
            "flow.name=planar",
            f"flow.k={DENSITY_K}",
            f"train.batch_size={DENSITY_BATCH}",
            f"device={device.type}",
            f"seed={args.seed}",
        ],
    )


def flowvae_trainer(cfg, device: torch.device):
    """The trainer `flowvae train` builds for ``cfg``."""
    trainer = build_trainer(cfg, device)
    wrap_model(trainer)
    return trainer


def flowvae_training(cfg, device: torch.device):
    """(experiment, step) where step() is flowvae.train.train_step, as the training loop runs it."""
    trainer = flowvae_trainer(cfg, device)
    state = {"step": 0, "skipped": 0, "last": None}

    def step():
        out = train_step(trainer, state["step"])
        state["skipped"] += out.ok is False
        state["step"] += 1
        state["last"] = out.loss
        return out.loss

    state["guard"] = trainer.guard
    step.state = state
    return trainer.experiment, step


def skip_flow(model) -> None:
    """Replace the flow layers by the identity while keeping the encoder's flow-parameter head in
    the graph (its output enters the loss times 0, so its GEMMs run forward and backward)."""

    def identity(z, params):
        return z + 0.0 * params[:, : z.shape[1]], z.new_zeros(z.shape[0])

    model.flow.forward = identity


def baseline_training(step):
    """Wrap a baseline step to keep its last loss (checked for finiteness after timing)."""
    state = {"step": 0, "skipped": 0, "last": None}

    def run():
        state["last"] = step()
        state["step"] += 1

    run.state = state
    run.model = step.model
    return run


def iw_max_rows(device: torch.device) -> int:
    """Decoder rows per pass, as flowvae.runs.evaluate chooses them on this device."""
    return MAX_ROWS.get(device.type, MAX_ROWS["cpu"])


def flowvae_iw(model, test, samples: int):
    """One chunk of `flowvae eval` (sharded_importance_nll): (step, images per step)."""
    per_chunk = min(max(1, iw_max_rows(test.device) // samples), test.shape[0])
    cursor = [0]

    def step():
        lo = cursor[0]
        cursor[0] = (lo + per_chunk) % max(1, test.shape[0] - per_chunk + 1)
        sharded_importance_nll(model, test[lo : lo + per_chunk], samples)

    return step, per_chunk


def baseline_iw(model, test, samples: int, images: int):
    cursor = [0]

    def step():
        lo = cursor[0]
        cursor[0] = (lo + images) % max(1, test.shape[0] - images + 1)
        bl.baseline_importance_nll(model, test[lo : lo + images], samples).double().cpu()

    return step


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- timing -------------------------------------------------------------------------------------


def interleaved(fns: dict, seconds: float, rounds: int, warmup: int, sync) -> dict:
    """Median seconds per call of each fn, timed in alternating blocks after a warm-up.

    Block sizes are set from the last warm-up call so that all blocks together take about
    ``seconds``; the order of the implementations flips every round (A B, B A, ...).
    """
    names = list(fns)
    est = {}
    for name in names:
        for _ in range(max(0, warmup - 1)):
            fns[name]()
        sync()
        t0 = time.perf_counter()
        fns[name]()
        sync()
        est[name] = time.perf_counter() - t0
    block = seconds / (rounds * len(names))
    n = {name: max(1, round(block / max(est[name], 1e-9))) for name in names}
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            sync()
            t0 = time.perf_counter()
            for _ in range(n[name]):
                fns[name]()
            sync()
            per_call[name].append((time.perf_counter() - t0) / n[name])
    return {
        name: {
            "median_s": statistics.median(per_call[name]),
            "min_s": min(per_call[name]),
            "max_s": max(per_call[name]),
            "calls_per_block": n[name],
            "blocks": rounds,
        }
        for name in names
    }


# -- memory (one fresh subprocess per item and implementation) ----------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _probe_density(spec: dict, args, device: torch.device):
    if device.type == "cpu":
        torch.set_num_threads(1)
    if spec["impl"] == "flowvae":
        return flowvae_training(density_config(args, device), device)[1]
    torch.manual_seed(args.seed)
    return bl.make_baseline_density_step(DENSITY_K, DENSITY_BATCH, device=device)


def _baseline_data(args, device: torch.device):
    from flowvae.data import load_mnist

    data = load_mnist(args.data_root, download=False, progress=False, device=device)
    torch.manual_seed(args.seed)
    return data


def _probe_vae(spec: dict, args, device: torch.device):
    if spec["impl"] == "flowvae":
        return flowvae_training(vae_config(spec["k"], args, device), device)[1]
    return bl.make_baseline_step(spec["k"], _baseline_data(args, device).train)


def _probe_iw(spec: dict, args, device: torch.device):
    samples = spec["samples"]
    if spec["impl"] == "flowvae":
        experiment, _ = flowvae_training(vae_config(IW_K, args, device), device)
        return flowvae_iw(experiment.model.eval(), experiment.data.test, samples)[0]
    test = _baseline_data(args, device).test
    per_chunk = min(max(1, iw_max_rows(device) // samples), test.shape[0])
    model = bl.BaselineVAE(IW_K).to(device).eval()
    return baseline_iw(model, test, samples, per_chunk)


#: benchmark item -> the callable its memory probe runs
PROBES = {"density": _probe_density, "vae": _probe_vae, "iw": _probe_iw}


def probe_fn(spec: dict, args, device: torch.device):
    """The callable a memory probe runs: the same code the timing uses (baseline probes load
    only the data, not flowvae's model)."""
    return PROBES[spec["item"]](spec, args, device)


def run_probe(args) -> None:
    spec = json.loads(args._probe)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = probe_fn(spec, args, device)
    # One untimed call first: what the first call initialises once (code pages, kernel caches,
    # the optimiser's state) is not the working memory of a step.
    fn()
    gc.collect()
    steps = spec.get("steps", 2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out = {"method": "cuda max_memory_allocated", "before": before, "peak": peak}
    else:
        before = (_status_kib("VmRSS") or 0) * 1024
        reset = _reset_peak_rss()
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for _ in range(steps):
            fn()
        if reset and _status_kib("VmHWM") is not None:
            peak = _status_kib("VmHWM") * 1024
            out = {"method": "VmHWM", "before": before, "peak": peak}
        else:  # the peak cannot be reset: the lifetime high-water mark, a lower bound on growth
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out = {"method": "ru_maxrss (lower bound)", "before": ru_before, "peak": peak}
    out["growth"] = out["peak"] - out["before"]
    print(json.dumps(out))


def measure_memory(spec: dict, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps(spec)]
    cmd += ["--device", args.device_resolved, "--data-root", args.data_root]
    cmd += ["--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # A fixed glibc mmap threshold: every allocation of 64 KiB or more is its own mapping and is
    # unmapped when freed, so the resident set follows the live tensors instead of heap reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        log(f"memory probe {spec} timed out")
        return None
    if proc.returncode != 0:
        log(f"memory probe {spec} failed:\n{proc.stderr.strip()[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- machine ------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip()


def git_revision() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        # The results files a benchmark run writes are not changes to what it measures.
        dirty = _git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results*"
        )
        return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "flowvae_revision": git_revision(),
        "load_average_at_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- the benchmark ------------------------------------------------------------------------------


def check_finite(name: str, state: dict, notes: list[str]) -> None:
    last = state["last"]
    if "guard" in state and state["guard"].deferred:  # skips counted on the device
        state["skipped"] += int(state["guard"].window)
    if state["skipped"]:
        notes.append(f"{name}: {state['skipped']} of {state['step']} steps were non-finite")
    if last is not None and not bool(torch.isfinite(last.detach())):
        notes.append(f"{name}: the last loss was non-finite (timing may be unrepresentative)")


def bench_vae(args, device, sync, notes: list[str]) -> list[dict]:
    """Every K and both implementations timed in one interleaved set of blocks, so that the flow
    overhead t(K)/t(0) compares blocks run side by side, not minutes apart."""
    fns, models, products = {}, {}, {}
    for k in args.ks:
        log(f"[vae K={k}] building")
        experiment, fv = flowvae_training(vae_config(k, args, device), device)
        torch.manual_seed(args.seed)
        base = baseline_training(bl.make_baseline_step(k, experiment.data.train))
        n_fv, n_bl = count_params(experiment.model), count_params(base.model)
        if n_fv != n_bl:
            notes.append(f"VAE K={k}: flowvae has {n_fv} parameters, the baseline {n_bl}")
        fns[("flowvae", k)], fns[("baseline", k)] = fv, base
        models[k] = n_fv
        if not args.no_floor:
            # A trainer of its own: the floor's optimiser steps must not move the timed weights.
            trainer = flowvae_trainer(vae_config(k, args, device), device)
            parts, products[k] = floor.floor_fns(trainer, lambda t=trainer: train_step(t, 0))
            fns[("floor", k)], fns[("optimizer", k)] = parts["floor"], parts["optimizer"]
        if k in args.head_only_ks and k > 0:
            head_exp, fh = flowvae_training(vae_config(k, args, device), device)
            skip_flow(head_exp.model)
            fns[("head only", k)] = fh
        if k in args.compile_ks:
            log(f"[vae K={k}] compiling")
            _, fc = flowvae_training(vae_config(k, args, device, compile=True), device)
            t0 = time.perf_counter()
            fc()
            fc.compile_seconds = time.perf_counter() - t0
            fns[("flowvae+compile", k)] = fc
    timing = interleaved(fns, args.seconds_per_item * len(args.ks), args.rounds, args.warmup, sync)
    rows = []
    for k in args.ks:
        check_finite(f"flowvae VAE K={k}", fns[("flowvae", k)].state, notes)
        check_finite(f"baseline VAE K={k}", fns[("baseline", k)].state, notes)
        row = {"k": k, "params": models[k]}
        row["flowvae"], row["baseline"] = timing[("flowvae", k)], timing[("baseline", k)]
        if ("head only", k) in timing:
            row["head_only"] = timing[("head only", k)]
        if ("floor", k) in timing:
            row["floor"], row["optimizer"] = timing[("floor", k)], timing[("optimizer", k)]
            row["gemm_flops"] = sum(p.flops for p in products[k])
        if ("flowvae+compile", k) in timing:
            check_finite(f"compiled VAE K={k}", fns[("flowvae+compile", k)].state, notes)
            row["compiled"] = timing[("flowvae+compile", k)]
            row["compile_seconds"] = fns[("flowvae+compile", k)].compile_seconds
        rows.append(row)
        log(
            f"[vae K={k}] flowvae {1 / row['flowvae']['median_s']:.1f} steps/s, "
            f"baseline {1 / row['baseline']['median_s']:.1f} steps/s"
        )
    del fns
    gc.collect()
    return rows


def bench_iw(args, device, sync) -> list[dict]:
    log(f"[iw K={IW_K}] building")
    experiment, _ = flowvae_training(vae_config(IW_K, args, device), device)
    model = experiment.model.eval()
    test = experiment.data.test[: max(1, args.iw_images)]
    torch.manual_seed(args.seed)
    bmodel = bl.BaselineVAE(IW_K).to(device).eval()
    rows = []
    for samples in args.iw_samples:
        fv, per_chunk = flowvae_iw(model, test, samples)
        base = baseline_iw(bmodel, test, samples, per_chunk)
        timing = interleaved(
            {"flowvae": fv, "baseline": base},
            args.seconds_per_item,
            args.rounds,
            args.warmup,
            sync,
        )
        rows.append({"samples": samples, "images_per_call": per_chunk, **timing})
        log(
            f"[iw S={samples}] flowvae {per_chunk / timing['flowvae']['median_s']:.1f} img/s, "
            f"baseline {per_chunk / timing['baseline']['median_s']:.1f} img/s"
        )
    return rows


def bench_iw_full(args, device, sync) -> dict:
    """Wall time of flowvae.runs.evaluate on the whole test set (planar K=IW_K, S = the
    first --iw-samples value) with --eval-threads threads, as `flowvae eval` runs it."""
    from flowvae.runs import EvalOptions, LoadedRun, evaluate

    samples = args.iw_samples[0]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.eval_threads)
    try:
        cfg = vae_config(IW_K, args, device)
        experiment, _ = flowvae_training(cfg, device)
        run = LoadedRun(cfg, experiment, {"step": 0}, device)
        images = experiment.data.test.shape[0] if not args.quick else 200
        log(f"[iw full] {images} test images, S={samples}, {torch.get_num_threads()} thread(s)")
        sync()
        t0 = time.perf_counter()
        result = evaluate(run, EvalOptions(iw_samples=samples, limit=images))
        sync()
        seconds = time.perf_counter() - t0
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    log(f"[iw full] {seconds:.1f} s")
    return {
        "samples": samples,
        "images": images,
        "threads": used,
        "seconds": seconds,
        "nll": result["nll"],
    }


def bench_density(args, device, sync, notes: list[str]) -> dict:
    log(f"[density K={DENSITY_K}] building")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as flowvae.train does for density runs
    try:
        experiment, fv = flowvae_training(density_config(args, device), device)
        torch.manual_seed(args.seed)
        step = bl.make_baseline_density_step(DENSITY_K, DENSITY_BATCH, device=device)
        base = baseline_training(step)
        timing = interleaved(
            {"flowvae": fv, "baseline": base},
            args.seconds_per_item,
            args.rounds,
            args.warmup,
            sync,
        )
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    check_finite("flowvae density", fv.state, notes)
    check_finite("baseline density", base.state, notes)
    log(
        f"[density] flowvae {1 / timing['flowvae']['median_s']:.1f} steps/s, "
        f"baseline {1 / timing['baseline']['median_s']:.1f} steps/s"
    )
    return {"k": DENSITY_K, "batch": DENSITY_BATCH, "threads": used, **timing}


def memory_specs(args) -> list[dict]:
    specs = [{"item": "vae", "k": k} for k in args.ks]
    specs += [{"item": "iw", "samples": s} for s in args.iw_samples]
    specs += [{"item": "density"}]
    if args.quick:  # each probe is a fresh process (imports, data): keep the smoke test short
        specs = specs[:1]
    out = []
    for spec in specs:
        steps = 1 if spec["item"] == "iw" else args.probe_steps
        for impl in ("flowvae", "baseline"):
            out.append({**spec, "impl": impl, "steps": steps})
    return out


def bench_memory(args) -> list[dict]:
    results = []
    for spec in memory_specs(args):
        log(f"[memory] {spec}")
        results.append({**spec, "result": measure_memory(spec, args)})
    return results


# -- report -------------------------------------------------------------------------------------


def rate(t: dict, per_call: float = 1.0) -> str:
    """'median (slowest block-fastest block)' in calls (or images) per second."""
    return (
        f"{per_call / t['median_s']:.3g} ({per_call / t['max_s']:.3g}-{per_call / t['min_s']:.3g})"
    )


def mib(mem: list[dict], impl: str, **key) -> str:
    for m in mem:
        if m["impl"] == impl and all(m.get(k) == v for k, v in key.items()):
            r = m["result"]
            return "failed" if r is None else f"{r['growth'] / 2**20:.1f}"
    return "-"


def markdown(results: dict) -> str:
    """The report: one section per benchmark item, then the raw results."""
    mem = results["memory"]
    lines = _machine_section(results)
    lines += _vae_section(results["vae"], mem)
    lines += _iw_section(results["iw"], results.get("iw_full"), mem)
    lines += _density_section(results["density"], mem)
    if results["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in results["notes"]), ""]
    lines += [
        "<details><summary>raw results (JSON)</summary>",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _machine_section(results: dict) -> list[str]:
    a = results["args"]
    mem_method = next((m["result"]["method"] for m in results["memory"] if m["result"]), None)
    return [
        "# flowvae benchmark results",
        "",
        f"`{results['command']}` on {results['date']}"
        + (" — **quick mode: smoke-test counts, not numbers to quote**" if a["quick"] else ""),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in results["machine"].items()),
        f"| timed seconds per item | {a['seconds_per_item']} ({a['rounds']} blocks each) |",
        "",
        "Rates are medians over the timed blocks, with the slowest and fastest block in brackets.",
        "Ratio = flowvae rate / baseline rate (> 1: flowvae is faster). Memory: peak growth in",
        "MiB over a few steps after one untimed step, in a fresh process",
        f"({mem_method or 'not measured'}; see docs/benchmarks.md).",
        "",
    ]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, every column right-aligned."""
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
        *("| " + " | ".join(cells) + " |" for cells in rows),
    ]


def _vae_section(vae: list[dict], mem: list[dict]) -> list[str]:
    ref = next((row for row in vae if row["k"] == 0), vae[0] if vae else None)
    ref_name = f"K={ref['k']}" if ref else ""
    head = ["K", "params", "flowvae steps/s", "baseline steps/s", "ratio"]
    head += [f"flowvae t(K)/t({ref_name})", f"baseline t(K)/t({ref_name})"]
    head += ["flowvae MiB", "baseline MiB"]
    rows = [
        [
            str(row["k"]),
            f"{row['params']:,}",
            rate(row["flowvae"]),
            rate(row["baseline"]),
            f"{row['baseline']['median_s'] / row['flowvae']['median_s']:.2f}",
            f"{row['flowvae']['median_s'] / ref['flowvae']['median_s']:.2f}",
            f"{row['baseline']['median_s'] / ref['baseline']['median_s']:.2f}",
            mib(mem, "flowvae", item="vae", k=row["k"]),
            mib(mem, "baseline", item="vae", k=row["k"]),
        ]
        for row in vae
    ]
    lines = [
        "## 1. VAE training step (MNIST, maxout 784-400-400 / 40-400-400-784, batch 100, Adam)",
        "",
        *_table(head, rows),
    ]
    return lines + _floor_table(vae) + _head_only_table(vae, ref, ref_name) + _compiled_table(vae)


def _floor_table(vae: list[dict]) -> list[str]:
    rows = []
    for row in vae:
        if "floor" not in row:
            continue
        f, o = row["floor"]["median_s"], row["optimizer"]["median_s"]
        step = row["flowvae"]["median_s"]
        rows.append(
            [str(row["k"]), f"{row['gemm_flops'] / 1e9:.2f}", f"{(f - o) * 1e3:.1f}"]
            + [f"{row['gemm_flops'] / (f - o) / 1e9:.0f}", f"{o * 1e3:.1f}", f"{f * 1e3:.1f}"]
            + [f"{step * 1e3:.1f}", f"**{f / step:.2f}**"]
        )
    if not rows:
        return []
    head = ["K", "GEMM GFLOP per step", "products ms", "GFLOP/s", "optimiser ms", "floor ms"]
    head += ["flowvae step ms", "floor / step"]
    intro = (
        "The floor: the step's matrix products (every Linear's forward, input-gradient and "
        "weight-gradient GEMM at the step's shapes) and then its optimiser step, run alone in "
        "that order (benchmarks/floor.py), same blocks. floor / step = 1 would be a step that "
        "spends nothing beyond them:"
    )
    return ["", intro, "", *_table(head, rows)]


def _head_only_table(vae: list[dict], ref: dict | None, ref_name: str) -> list[str]:
    heads = [row for row in vae if "head_only" in row]
    if not heads:
        return []
    t0 = ref["flowvae"]["median_s"]
    head = ["K", "head only steps/s", f"head only t(K)/t({ref_name})"]
    head += [f"flowvae t(K)/t({ref_name})", "flow layers' share of the step"]
    rows = []
    for row in heads:
        h, f = row["head_only"]["median_s"], row["flowvae"]["median_s"]
        rows.append(
            [str(row["k"]), rate(row["head_only"]), f"{h / t0:.2f}", f"{f / t0:.2f}"]
            + [f"{(f - h) / f:.1%}"]
        )
    intro = (
        "The floor under any flow code: flowvae with the flow layers skipped but the encoder's "
        "flow-parameter head (Linear 400 → K·81) computed and backpropagated, same blocks:"
    )
    return ["", intro, "", *_table(head, rows)]


def _compiled_table(vae: list[dict]) -> list[str]:
    compiled = [row for row in vae if "compiled" in row]
    if not compiled:
        return []
    first = compiled[0]["compiled"]["median_s"]
    head = ["K", "eager steps/s", "compiled steps/s", "compiled / eager"]
    head += [f"compiled t(K)/t({compiled[0]['k']})", "first step (compile) s"]
    rows = [
        [str(row["k"]), rate(row["flowvae"]), rate(row["compiled"])]
        + [f"{row['flowvae']['median_s'] / row['compiled']['median_s']:.2f}"]
        + [f"{row['compiled']['median_s'] / first:.2f}", f"{row['compile_seconds']:.1f}"]
        for row in compiled
    ]
    intro = (
        "With `train.compile: true` (torch.compile of the model's forward), timed in the "
        "same interleaved blocks:"
    )
    return ["", intro, "", *_table(head, rows)]


def _iw_section(iw: list[dict], full: dict | None, mem: list[dict]) -> list[str]:
    head = ["S", "images per call", "flowvae images/s", "baseline images/s", "ratio"]
    head += ["flowvae MiB", "baseline MiB"]
    rows = [
        [str(row["samples"]), str(row["images_per_call"])]
        + [rate(row[impl], row["images_per_call"]) for impl in ("flowvae", "baseline")]
        + [f"{row['baseline']['median_s'] / row['flowvae']['median_s']:.2f}"]
        + [mib(mem, impl, item="iw", samples=row["samples"]) for impl in ("flowvae", "baseline")]
        for row in iw
    ]
    title = f"## 2. Importance-sampled -log p(x), planar K={IW_K} (test images per second)"
    lines = ["", title, "", *_table(head, rows)]
    if full:
        lines += [
            "",
            f"Whole test split with `flowvae.runs.evaluate` (planar K={IW_K}, untrained "
            f"weights): {full['images']:,} images at S = {full['samples']} in "
            f"**{full['seconds']:.1f} s** on {full['threads']} thread(s) "
            f"({full['images'] / full['seconds']:.0f} images/s).",
        ]
    return lines


def _density_section(d: dict, mem: list[dict]) -> list[str]:
    return [
        "",
        f"## 3. Density matching step (U1, planar K={d['k']}, {d['batch']} samples, "
        f"{d['threads']} thread(s))",
        "",
        "| flowvae steps/s | baseline steps/s | ratio | flowvae MiB | baseline MiB |",
        "|---:|---:|---:|---:|---:|",
        f"| {rate(d['flowvae'])} | {rate(d['baseline'])} "
        f"| {d['baseline']['median_s'] / d['flowvae']['median_s']:.2f} "
        f"| {mib(mem, 'flowvae', item='density')} | {mib(mem, 'baseline', item='density')} |",
        "",
    ]


def resolve_device(name: str) -> torch.device:
    from flowvae import device
    from flowvae.errors import ConfigError

    try:
        return device.resolve_device(name)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._probe:
        run_probe(args)
        return
    device = resolve_device(args.device)
    args.device_resolved = device.type
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = syncer(device)
    start = time.perf_counter()
    results: dict = {
        "command": " ".join(
            ["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(device),
        "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_") and k != "device_resolved"
        },
        "notes": [],
    }
    torch.manual_seed(args.seed)
    results["vae"] = bench_vae(args, device, sync, results["notes"])
    results["iw"] = bench_iw(args, device, sync)
    results["iw_full"] = None if args.no_full_eval else bench_iw_full(args, device, sync)
    results["density"] = bench_density(args, device, sync, results["notes"])
    results["memory"] = [] if args.no_memory else bench_memory(args)
    if args.quick and not args.no_memory:
        results["notes"].append("memory measured for the first VAE item only (--quick)")
    results["machine"]["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results["seconds"] = round(time.perf_counter() - start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    if out.suffix == ".json":
        out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    else:
        out.write_text(text, encoding="utf-8")
    print(text.split("<details>")[0].rstrip())
    log(f"wrote {out} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
