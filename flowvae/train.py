"""One training loop for every experiment: optimiser, annealing, progress, TensorBoard,
periodic validation, atomic checkpoints, resume, NaN guard and clean interruption."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flowvae import __version__, checkpoint, distributed
from flowvae.config import Config, dump, from_dict, to_dict
from flowvae.device import resolve_device
from flowvae.errors import ConfigError, TrainingError
from flowvae.experiment import anneal_beta, build_experiment


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving last.pt."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        self.exit_code = 128 + signum
        super().__init__(f"interrupted at step {step}")


@dataclass
class RunResult:
    out_dir: Path
    step: int
    best_score: float
    last: dict[str, float]
    seconds: float


def make_optimizer(
    cfg: Config, params, device: torch.device | None = None
) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        # The fused kernel updates every tensor in one pass: on CPU it is 3x cheaper than the
        # per-tensor loop for the VAE, and 10x for a density flow's many tiny parameters.
        return torch.optim.Adam(params, lr=t.lr, fused=True)
    if t.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=t.lr, eps=1e-7)
    return torch.optim.RMSprop(params, lr=t.lr, momentum=t.momentum)


def gradient_norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """Total gradient norm, clipping to ``clip`` when set (without it, no gradient is rescaled)."""
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def deferred_guard(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether the non-finite guard runs without a per-step host sync.

    On CUDA a sync per step stops the host from queueing the next step while the GPU works,
    which costs a launch-bound model much of its speed. A fused optimizer can skip its own
    update on device (``found_inf``), so there the host checks only every
    min(log_every, max_bad_steps) steps. Elsewhere the per-step check is free.
    """
    return device.type == "cuda" and bool(optimizer.defaults.get("fused"))


def raise_bad_steps(run_len: int, step: int, limit: int, last_path: Path) -> None:
    saved = (
        f"last good checkpoint: {last_path}"
        if last_path.exists()
        else "no checkpoint was written yet"
    )
    raise TrainingError(
        f"{run_len} non-finite steps in a row at step {step} "
        f"(train.max_bad_steps = {limit}) — lower train.lr, set "
        f"train.grad_clip, or check the data; {saved}"
    )


def make_schedule(cfg: Config, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    steps = cfg.train.steps
    if cfg.train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def check_output_folder(out_dir: Path, need_bytes: int) -> None:
    """Fail before training if the run folder cannot be written or the disk is nearly full."""
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output folder {out_dir} ({exc.strerror or exc}) — choose another with --out"
        ) from None
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise ConfigError(
            f"only {free / 2**20:.1f} MiB free in {out_dir}, checkpoints need about "
            f"{need_bytes / 2**20:.1f} MiB — free some space or choose another folder with --out"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@contextmanager
def signals_caught():
    """Turn SIGINT/SIGTERM into a flag the loop polls, so a checkpoint can be written first."""
    caught: list[int] = []
    handlers = {}

    def handler(signum, _frame):
        caught.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield caught
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


@contextmanager
def schedule_may_lead():
    """The schedule steps on skipped (non-finite) steps too, so a run whose first step is skipped
    steps it before the optimizer ever has: intended here, not the misuse torch warns of."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer"
        )
        yield


@contextmanager
def held_out_rng(seed: int, device: torch.device):
    """Validation draws from its own seeded stream: the training stream is untouched (so resume
    is exact) and every validation uses the same noise (so scores are comparable)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1_000_003)
        yield


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard scalars and images."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        except OSError as exc:
            raise TrainingError(
                f"could not write {self.path}: {exc.strerror or exc} — free space on that disk "
                "or choose another folder with --out"
            ) from None
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, step: int, images: dict[str, Any]) -> None:
        if self.writer is not None:
            for key, img in images.items():
                self.writer.add_image(key, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """save_atomic, with a failed write (full disk, lost mount) as a one-line TrainingError."""
    try:
        checkpoint.save_atomic(obj, path)
    except OSError as exc:
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier one exists"
        raise TrainingError(
            f"could not write checkpoint {path}: {exc.strerror or exc} — free space on that disk "
            f"or choose another folder with --out (then --resume); {kept}"
        ) from None


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * 3 * n + 8 * 2**20  # last + best, each with two optimiser moments, plus slack


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    on_start: Callable[[Config, Path], None] | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``. ``on_start(cfg, out_dir)`` runs once the run's own config
    is known (the saved one on resume) and the resume/device checks have passed, so a caller's
    banner never precedes a one-line usage error."""
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"

    resume_state = None
    if resume:
        if not last_path.exists():
            raise ConfigError(f"--resume: no checkpoint at {last_path} — start without --resume")
        resume_state = checkpoint.load(last_path)
        saved = from_dict(resume_state["config"])
        # The run's own config wins, except for the length of the run.
        saved.train.steps = cfg.train.steps
        cfg = saved
    elif last_path.exists():
        raise ConfigError(
            f"{out_dir} already holds a run — add --resume to continue it, or choose another --out"
        )

    device = resolve_device(cfg.device)
    shard, device = distributed.init(device, cfg.train.batch_size)
    main = shard.is_main  # only rank 0 writes files, logs and progress
    if main:
        check_output_folder(out_dir, 0)  # writable at all? (before the banner and data loading)
    if on_start is not None and main:
        on_start(cfg, out_dir)
    torch.manual_seed(cfg.seed)
    experiment = build_experiment(cfg, device)
    if device.type == "cpu" and getattr(experiment, "single_thread", False):
        # 2-D problems are a few hundred tiny ops per step: threads only add sync overhead.
        torch.set_num_threads(1)
    model = experiment.model
    if main:
        check_output_folder(out_dir, estimate_checkpoint_bytes(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    schedule = make_schedule(cfg, optimizer)

    step, best, elapsed_before = 0, math.inf, 0.0
    if resume_state is not None:
        elapsed_before = float(resume_state.get("elapsed", 0.0))
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
        step, best = int(resume_state["step"]), float(resume_state["best_score"])
        set_rng_state(resume_state["rng"], device)
        if main:
            truncate_metrics(out_dir / "metrics.jsonl", step)
    if main:
        (out_dir / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    if shard.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        experiment.forward_model = DistributedDataParallel(model, device_ids=ids)
        experiment.shard = shard

    if cfg.train.compile:
        # Only the model's forward is compiled: the step counter and β stay Python values
        # outside the graph (compiling train_loss recompiled for every new step).
        experiment.forward_model = torch.compile(experiment.forward_model, dynamic=False)

    def state(score: float | None = None) -> dict[str, Any]:
        return checkpoint.make_checkpoint(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            step=step,
            best_score=best,
            score=score,
            rng=rng_state(device),
            elapsed=elapsed_before + time.perf_counter() - start_time,
            config=to_dict(cfg),
            experiment=experiment.summary(),
        )

    log = MetricsLog(out_dir, tensorboard=tensorboard) if main else None
    t = cfg.train
    clip = t.grad_clip if t.grad_clip > 0 else None
    bad_in_a_row = 0
    deferred = deferred_guard(optimizer, device)
    check_every = min(t.log_every, t.max_bad_steps)
    bad_run = torch.zeros((), device=device)  # current run of non-finite steps (deferred)
    bad_window = torch.zeros((), device=device)  # non-finite steps since the last check
    last_metrics: dict[str, float] = {}
    start_time = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (progress and main),
        transient=False,
    )
    try:
        with signals_caught() as caught, bar, schedule_may_lead():
            task = bar.add_task("train", total=t.steps, completed=step, info="")
            while step < t.steps:
                beta = anneal_beta(step, t.anneal_steps)
                model.train()
                loss, metrics = experiment.train_loss(step, beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = gradient_norm(params, clip)
                # Ranks agree on the mean loss and on whether anyone was signalled, so they skip,
                # stop and save together.
                loss_all, stop_all = distributed.agree(loss.detach(), bool(caught), shard)
                if deferred:
                    # The guard without a host sync: the fused optimizer itself skips the
                    # update when found_inf is 1; the host looks every few steps.
                    nonfinite = (~torch.isfinite(loss_all + grad_norm)).float()
                    optimizer.found_inf = nonfinite
                    optimizer.step()
                    schedule.step()
                    bad_run = (bad_run + nonfinite) * nonfinite
                    bad_window += nonfinite
                    step += 1
                    window_steps += 1
                    if step % check_every == 0 or step == t.steps or stop_all:
                        n_bad, run_len = int(bad_window), int(bad_run)
                        bad_window.zero_()
                        if n_bad and main:
                            console.print(
                                f"[yellow]warning:[/] {n_bad} non-finite loss or gradient "
                                f"step(s) up to step {step}, updates skipped "
                                f"({run_len}/{t.max_bad_steps} in a row)"
                            )
                        if run_len >= t.max_bad_steps:
                            raise_bad_steps(run_len, step, t.max_bad_steps, last_path)
                    finite = None  # known on the host only at the checks above
                # One host sync per step: the price of never letting a NaN into the weights.
                elif finite := bool(torch.isfinite(loss_all + grad_norm)):
                    bad_in_a_row = 0
                    optimizer.step()
                    window_steps += 1
                if not deferred:
                    # The learning rate follows the step count, skipped steps included (as the
                    # deferred guard must: it learns of a skip only later).
                    schedule.step()
                    step += 1
                if finite is False:
                    # The update is skipped, but the step still reaches the checkpoint,
                    # validation and signal checks below (the weights are the last good ones).
                    bad_in_a_row += 1
                    if main:
                        console.print(
                            f"[yellow]warning:[/] non-finite loss or gradient at step {step}, "
                            f"update skipped ({bad_in_a_row}/{t.max_bad_steps} in a row)"
                        )
                    if bad_in_a_row >= t.max_bad_steps:
                        raise_bad_steps(bad_in_a_row, step, t.max_bad_steps, last_path)
                elif (
                    main
                    and (step % t.log_every == 0 or step == t.steps)
                    and math.isfinite(float(loss_all))
                ):
                    now = time.perf_counter()
                    rate = window_steps / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    last_metrics = {
                        "loss": float(loss_all),
                        "beta": beta,
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": float(grad_norm),
                        "steps_per_s": rate,
                        **{k: float(v) for k, v in metrics.items()},
                    }
                    log.scalars(step, last_metrics, "train")
                    bar.update(
                        task,
                        info=f"loss {last_metrics['loss']:.4g}  β {beta:.2f}  {rate:.0f} it/s",
                    )
                bar.update(task, completed=step)

                if main and (step % t.eval_every == 0 or step == t.steps):
                    model.eval()
                    with held_out_rng(cfg.seed, device):
                        val = experiment.validate()
                        images = experiment.images()
                    log.scalars(step, val, "valid")
                    log.images(step, images)
                    if val["score"] < best and math.isfinite(val["score"]):
                        best = val["score"]
                        save_checkpoint(state(val["score"]), best_path)
                if main and (step % t.checkpoint_every == 0 or step == t.steps):
                    save_checkpoint(state(), last_path)
                if stop_all:
                    if main:
                        save_checkpoint(state(), last_path)
                    raise Interrupted(caught[0] if caught else signal.SIGTERM, step, last_path)
            if main and not best_path.exists():  # no finite validation: keep the final weights
                save_checkpoint(state(), best_path)
    finally:
        if log is not None:
            log.close()
        if shard.world > 1:
            # Free the DDP wrapper while the process group is still registered. Freed after it,
            # its reducer held the group's last reference and destroyed it with the GIL held,
            # which deadlocked against a gloo worker thread waiting for the GIL (seen at exit).
            experiment.forward_model = model
            gc.collect()
        distributed.finish()
    seconds = time.perf_counter() - start_time
    if main:
        write_run_info(out_dir, cfg, device, step, elapsed_before + seconds)
    return RunResult(out_dir, step, best, last_metrics, seconds)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def write_run_info(
    out_dir: Path, cfg: Config, device: torch.device, step: int, seconds: float
) -> None:
    """run.json: what ran where and for how long (read by `flowvae report`)."""
    info = {
        "steps": step,
        "train_seconds": seconds,
        "device": device.type,
        "hardware": hardware_name(device),
        "torch": torch.__version__,
        "flowvae": __version__,
    }
    if device.type == "cpu" and cfg.flow.name == "planar" and cfg.flow.k > 0:
        from flowvae.flows import planar_kernel

        info["planar_kernel"] = planar_kernel.status()
    (out_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def default_out_dir(cfg: Config) -> Path:
    what = cfg.target.name if cfg.experiment == "density" else cfg.data.name
    return Path("runs") / f"{what}-{cfg.flow.name}-k{cfg.flow.k}-s{cfg.seed}"


def clean_env_threads() -> None:
    """Respect OMP_NUM_THREADS when set; otherwise let torch choose."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))
