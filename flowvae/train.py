"""One training loop for every experiment.

Set-up (run folder, model, optimiser, restored state, DDP/compile wrapping), then
``train_step`` until done, with periodic logging, validation and atomic checkpoints. The
benchmark times the same ``train_step``.
"""

from __future__ import annotations

import gc
import math
import signal
import sys
import time
import types
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from flowvae import checkpoint, distributed, experiments, guard, memory, plugins
from flowvae.config import Config, dump, from_dict, to_dict
from flowvae.device import resolve_device
from flowvae.distributed import SINGLE, Shard
from flowvae.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from flowvae.experiments import Experiment, anneal_beta
from flowvae.resume import check_resume
from flowvae.run_folder import (
    MetricsLog,
    check_output_folder,
    checkpoint_bytes,
    remove_stale_temps,
    save_checkpoint,
    truncate_metrics,
    write_run_info,
)
from flowvae.runlock import hold_run_folder
from flowvae.tidy import NewPaths, removed_on_failure


@dataclass
class RunResult:
    out_dir: Path
    step: int
    best_score: float
    last: dict[str, float]
    seconds: float


@dataclass
class Trainer:
    """Everything one update touches. ``model`` holds the weights; ``forward_model`` is what the
    loss runs through (the same module, or its DDP / compiled wrapper)."""

    cfg: Config
    experiment: Experiment
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    guard: guard.NonFiniteGuard
    device: torch.device
    shard: Shard = SINGLE
    forward_model: nn.Module | None = None
    params: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.forward_model = self.forward_model or self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class StepOutput:
    loss: Tensor  # mean over ranks
    metrics: dict[str, Tensor]
    grad_norm: Tensor
    beta: float
    ok: bool | None  # whether the update ran (None: known on the device only)
    stop: bool  # some rank was signalled


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        # The fused kernel updates every tensor in one pass: on CPU it is 3x cheaper than the
        # per-tensor loop for the VAE, and 10x for a density flow's many tiny parameters.
        return torch.optim.Adam(params, lr=t.lr, fused=True)
    return torch.optim.RMSprop(params, lr=t.lr, momentum=t.momentum)


def make_schedule(cfg: Config, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    steps = cfg.train.steps
    if cfg.train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def gradient_norm(params: list[Tensor], clip: float | None) -> Tensor:
    """Total gradient norm, clipping to ``clip`` when set (without it, no gradient is rescaled)."""
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def build_trainer(cfg: Config, device: torch.device, shard: Shard = SINGLE) -> Trainer:
    """The experiment, its optimiser, schedule and guard (seeded from cfg.seed)."""
    torch.manual_seed(cfg.seed)
    experiment = experiments.build(cfg, device)
    if device.type == "cpu" and experiment.single_thread:
        torch.set_num_threads(1)
    model = experiment.model
    optimizer = make_optimizer(cfg, experiment.param_groups())
    t = cfg.train
    deferred = guard.uses_deferred(optimizer, device)
    check_every = min(t.log_every, t.max_bad_steps)
    nonfinite = guard.NonFiniteGuard(t.max_bad_steps, check_every, deferred, device)
    schedule = make_schedule(cfg, optimizer)
    return Trainer(cfg, experiment, model, optimizer, schedule, nonfinite, device, shard)


def train_step(tr: Trainer, step: int, signalled: bool = False) -> StepOutput:
    """One update: the annealed loss on a fresh batch, backward, clipping, and the optimizer
    step unless the loss or gradient is non-finite. The schedule advances either way."""
    t = tr.cfg.train
    beta = anneal_beta(step, t.anneal_steps)
    tr.model.train()
    batch = tuple(tr.shard.take(x) for x in tr.experiment.batch(t.batch_size))
    loss, metrics = tr.experiment.loss(tr.forward_model, batch, beta)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = gradient_norm(tr.params, t.grad_clip if t.grad_clip > 0 else None)
    # Ranks agree on the mean loss and on whether anyone was signalled, so they skip, stop and
    # save together.
    loss_all, stop = distributed.agree(loss.detach(), signalled, tr.shard)
    ok = tr.guard.step(tr.optimizer, loss_all + grad_norm)
    tr.schedule.step()
    return StepOutput(loss_all, metrics, grad_norm, beta, ok, stop)


# -- set-up -------------------------------------------------------------------------------------


def prepare_resume(
    cfg: Config, out_dir: Path, resume: bool, console: Console
) -> tuple[Config, dict | None]:
    """The config to run (the saved one on resume, with the new run length) and the saved
    state; refuses to start a fresh run over a finished or interrupted one. A corrupt last.pt
    falls back to the newest intact checkpoint, saying so."""
    ckpt_dir = out_dir / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    if not resume:
        if last_path.exists():
            raise ConfigError(
                f"{out_dir} already holds a run — add --resume to continue it, or choose "
                "another --out"
            )
        return cfg, None
    try:  # train() has checked, before taking the lock, that last.pt exists
        state = checkpoint.load(last_path)
    except CheckpointError as exc:
        found = checkpoint.newest_intact(ckpt_dir, names=("best.pt",))
        if found is None:
            raise CheckpointError(
                f"--resume: {exc}; no intact checkpoint to fall back to"
            ) from None
        console.print(
            f"[yellow]warning:[/] {exc}; resuming from {found.path.name} (step "
            f"{found.ckpt['step']}) instead",
            highlight=False,
            soft_wrap=True,
        )
        state = found.ckpt
    saved = from_dict(state["config"])
    # the run's own config wins, except for what check_resume lets a run change
    saved.train.steps, saved.device = cfg.train.steps, cfg.device
    return saved, state


def restore(tr: Trainer, state: dict[str, Any]) -> tuple[int, float, float]:
    """Load a checkpoint into the trainer; returns (step, best score, seconds trained)."""
    tr.model.load_state_dict(state["model"])
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.schedule.load_state_dict(state["schedule"])
    set_rng_state(state["rng"], tr.device)
    return int(state["step"]), float(state["best_score"]), float(state.get("elapsed", 0.0))


def wrap_model(tr: Trainer) -> None:
    """DDP across torchrun's processes and/or torch.compile, as the config asks."""
    if tr.shard.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [tr.device.index] if tr.device.type == "cuda" else None
        tr.forward_model = DistributedDataParallel(tr.model, device_ids=ids)
    if tr.cfg.train.compile:
        # Only the model's forward is compiled: the step counter and β stay Python values
        # outside the graph (compiling the loss recompiled for every new step).
        tr.forward_model = torch.compile(tr.forward_model, dynamic=False)


def unwrap_model(tr: Trainer) -> None:
    """Free the DDP wrapper while the process group is still registered. Freed after it, its
    reducer held the group's last reference and destroyed it with the GIL held, which
    deadlocked against a gloo worker thread waiting for the GIL (seen at exit)."""
    tr.forward_model = tr.model
    gc.collect()


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


def progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


# -- the loop -----------------------------------------------------------------------------------


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    on_start: Callable[[Config, Path], None] | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``, holding the folder's write lock throughout (rank 0).

    ``on_start(cfg, out_dir)`` runs once the run's config is known (the saved one on resume),
    the resume/device checks have passed and its data and model are set up, so a caller's
    banner never precedes a one-line usage error. A second process writing to the same folder
    is refused at once. On resume, ``cfg`` must be the stored run's (flowvae.resume.check_resume).
    A run that fails before it writes a checkpoint (bad data, no memory, NaN from the start)
    leaves nothing behind.
    """
    out_dir = Path(out_dir)
    # What can be checked without writing is checked before the lock creates the folder.
    resolve_device(cfg.device)
    last = out_dir / "checkpoints" / "last.pt"
    if resume and not last.exists():
        raise ConfigError(f"--resume: no checkpoint at {last} — start without --resume")
    if resume:
        check_resume(out_dir, cfg)
    main = distributed.is_main_process()
    lock = hold_run_folder(out_dir) if main else nullcontext()
    new, before = NewPaths(out_dir), _stamp(last)
    kept = lambda: not main or _stamp(last) != before  # noqa: E731  (a checkpoint was written)
    with lock, removed_on_failure(new, kept):
        return _train(
            cfg, out_dir, resume, console or Console(stderr=True), progress, tensorboard, on_start
        )


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def warn_short_warmup(cfg: Config, console: Console) -> None:
    """Say at the start when the β warm-up outlasts the run: the model would never be fitted
    to the full objective (an MNIST run at 300 steps ends at β = 0.07, every sample a blur)."""
    t = cfg.train
    end = anneal_beta(t.steps, t.anneal_steps)
    if end < 1.0:
        console.print(
            f"[yellow]warning:[/] the β warm-up (train.anneal_steps = {t.anneal_steps:,}) is "
            f"longer than the run (train.steps = {t.steps:,}): β ends at {end:.2f}, not 1, so "
            "the run never fits the full objective — raise train.steps or lower "
            "train.anneal_steps",
            highlight=False,
            soft_wrap=True,
        )


def _train(cfg, out_dir, resume, console, progress, tensorboard, on_start) -> RunResult:
    if distributed.is_main_process():
        remove_stale_temps(out_dir)  # a killed writer's leftovers (the lock says it is dead)
    cfg, saved = prepare_resume(cfg, out_dir, resume, console)
    shard, device = distributed.init(resolve_device(cfg.device), cfg.train.batch_size)
    main = shard.is_main  # only rank 0 writes files, logs and progress
    if main:
        check_output_folder(out_dir, 0)  # writable at all? (before the data loading)
    with memory_errors(f"train.batch_size (now {cfg.train.batch_size:,})"):
        tr = build_trainer(cfg, device, shard)
        memory.check_batch_fits(tr.experiment, cfg.train.batch_size // shard.world, device)
    if main:  # data and model are set up: what fails from here on is not a usage error
        if on_start is not None:
            on_start(cfg, out_dir)
        warn_short_warmup(cfg, console)
    step, best, elapsed = restore(tr, saved) if saved is not None else (0, math.inf, 0.0)
    if main:
        check_output_folder(out_dir, checkpoint_bytes(tr.model))
        if saved is not None:
            truncate_metrics(out_dir / "metrics.jsonl", step)
        checkpoint.write_text_atomic(out_dir / "config.yaml", dump(cfg))
    wrap_model(tr)
    log = Logger(out_dir, console, main, tensorboard, step, tr.experiment)
    ckpts = Checkpoints(out_dir, main, elapsed)
    what = f"train.batch_size (now {cfg.train.batch_size:,}), eval.valid_samples or eval.batch_size"
    try:
        with memory_errors(what, ckpts.note):
            step, best = loop(tr, step, best, log, ckpts, progress_bar(console, progress and main))
    except guard.TooManyBadSteps as exc:
        raise TrainingError(f"{exc}; {ckpts.note()}") from None
    finally:
        log.close()
        if shard.world > 1:
            unwrap_model(tr)
        distributed.finish()
    if main:
        write_run_info(out_dir, device, step, ckpts.seconds())
    return RunResult(out_dir, step, best, log.last, ckpts.seconds() - elapsed)


@contextmanager
def memory_errors(what: str, note: Callable[[], str] | None = None):
    """A failed allocation as one line naming ``what`` to lower (and, from ``note``, what was
    kept)."""
    try:
        yield
    except RuntimeError as exc:
        if not memory.is_out_of_memory(exc):
            raise
        raise memory.out_of_memory(exc, what + (f"; {note()}" if note else "")) from None


def loop(
    tr: Trainer, step: int, best: float, log: Logger, ckpts: Checkpoints, bar: Progress
) -> tuple[int, float]:
    """train_step until cfg.train.steps, logging, validating and checkpointing on the way;
    returns the final step and best validation score."""
    t = tr.cfg.train
    with signals_caught() as caught, schedule_may_lead(), bar:
        task = bar.add_task("train", total=t.steps, completed=step, info="")
        while step < t.steps:
            out = train_step(tr, step, signalled=bool(caught))
            step += 1
            last = step == t.steps or out.stop
            log.warn(tr.guard.observe(step, out.ok, last))
            tr.guard.stop_if_stuck(step)
            if out.ok is not False and (step % t.log_every == 0 or last):
                log.train(step, out, tr.optimizer, bar, task)
            bar.update(task, completed=step)
            if step % t.eval_every == 0 or step == t.steps:
                best = ckpts.keep_best(tr, step, best, log.validation(step, tr))
            if step % t.checkpoint_every == 0 or last:
                ckpts.save(tr, ckpts.last, step, best)
            if out.stop:
                raise Interrupted(caught[0] if caught else signal.SIGTERM, step, ckpts.last)
    if log.unscored:  # nothing held out: the final weights, on a resumed run too
        log.warn("no validation split (data.valid_size: 0): best.pt is the last checkpoint")
    if log.unscored or not ckpts.best.exists():  # or no finite validation: the final weights
        ckpts.save(tr, ckpts.best, step, best)
    return step, best


class Checkpoints:
    """last.pt and best.pt of a run folder, written atomically by rank 0 only."""

    def __init__(self, out_dir: Path, main: bool, elapsed: float) -> None:
        self.last, self.best = (
            out_dir / "checkpoints" / "last.pt",
            out_dir / "checkpoints" / "best.pt",
        )
        self.main, self.elapsed, self.start = main, elapsed, time.perf_counter()

    def seconds(self) -> float:
        """Training time of the run, earlier sessions included."""
        return self.elapsed + time.perf_counter() - self.start

    def save(
        self, tr: Trainer, path: Path, step: int, best: float, score: float | None = None
    ) -> None:
        if self.main:
            save_checkpoint(snapshot(tr, step, best, self.seconds(), score), path)

    def keep_best(self, tr: Trainer, step: int, best: float, score: float) -> float:
        """Save best.pt when ``score`` beats ``best``; returns the new best."""
        if score >= best:
            return best
        self.save(tr, self.best, step, score, score)
        return score

    def note(self) -> str:
        """Where a stopped run left what a user needs to look into it."""
        if self.last.exists():
            metrics = self.last.parent.parent / "metrics.jsonl"
            logged = f", metrics in {metrics}" if metrics.exists() else ""
            return f"last good checkpoint: {self.last}{logged}"
        return "no checkpoint was written yet, so nothing was kept"


def snapshot(
    tr: Trainer, step: int, best: float, seconds: float, score: float | None
) -> dict[str, Any]:
    return checkpoint.make_checkpoint(
        model=tr.model.state_dict(),
        optimizer=tr.optimizer.state_dict(),
        schedule=tr.schedule.state_dict(),
        step=step,
        best_score=best,
        score=score,
        rng=rng_state(tr.device),
        elapsed=seconds,
        config=to_dict(tr.cfg),
        experiment=tr.experiment.summary(),
        sources=plugins.sources(tr.cfg),  # where a flow from outside the package came from
    )


class Logger:
    """What the loop reports: warnings, training metrics with steps/s, validation (rank 0)."""

    def __init__(
        self,
        out_dir: Path,
        console: Console,
        main: bool,
        tensorboard: bool,
        step: int,
        experiment: Experiment | None = None,
    ) -> None:
        self.console, self.main = console, main
        # what the progress line shows, named, with units (the experiment says which metric)
        self.shown = getattr(experiment, "progress", None)
        self.score_label = getattr(experiment, "score_label", "validation score")
        self.val_text = ""
        self.metrics = MetricsLog(out_dir, tensorboard=tensorboard) if main else None
        self.last: dict[str, float] = {}
        self.window_start, self.window_step = time.perf_counter(), step
        self.unscored = False  # a validation found nothing held out

    def warn(self, message: str | None) -> None:
        if message and self.main:
            self.console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    def train(self, step: int, out: StepOutput, optimizer, bar: Progress, task) -> None:
        """Log the step's metrics (when its loss is finite) and show them on the bar."""
        loss = float(out.loss)
        if not (self.main and math.isfinite(loss)):
            return
        now = time.perf_counter()
        rate = (step - self.window_step) / max(now - self.window_start, 1e-9)
        self.window_start, self.window_step = now, step
        self.last = {
            "loss": loss,
            "beta": out.beta,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(out.grad_norm),
            "steps_per_s": rate,
            **{k: float(v) for k, v in out.metrics.items()},
        }
        self.metrics.scalars(step, self.last, "train")
        key, label = self.shown or ("loss", "loss")
        value = f"{label} {self.last[key]:.4g}" + (" nats" if self.shown else "")
        bar.update(task, info=f"{value}{self.val_text}  β {out.beta:.2f}  {rate:.0f} it/s")

    def validation(self, step: int, tr: Trainer) -> float:
        """Validate on held-out noise, log it; returns the score (inf when not finite, and on
        ranks other than 0, which do not validate)."""
        if not self.main:
            return math.inf
        tr.model.eval()
        with held_out_rng(tr.cfg.seed, tr.device):
            val = tr.experiment.validate()
            images = tr.experiment.images()
        self.metrics.images(step, images)
        if not val:  # no validation split: nothing to score
            self.unscored = True
            return math.inf
        self.metrics.scalars(step, val, "valid")
        self.val_text = f"  {self.score_label} {val['score']:.4g} nats"
        return val["score"] if math.isfinite(val["score"]) else math.inf

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


class _CallableModule(types.ModuleType):
    """``flowvae.train(config, out=..., **overrides)`` is the Python API's train (flowvae.api):
    the package attribute ``train`` is this module once imported, so the module is callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        from flowvae.api import train as api_train

        return api_train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
