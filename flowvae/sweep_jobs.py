"""`flowvae sweep --jobs N`: N runs of a grid at once, each in a worker process of its own.

The sweep process is a scheduler. For each run it takes the run folder's lock (a run another
sweep holds is passed over, a finished one skipped), then starts ``python -m flowvae sweep ...
--point NAME`` on it with the lock's descriptor handed down, so the worker trains and evaluates
under the very lock its parent took, and no third process can slip in between. The worker's
output goes to RUN/log.txt; the scheduler shows one display for the grid.

Threads: each worker gets ``cores // min(N, runs)`` of them (at least one) through
OMP_NUM_THREADS and MKL_NUM_THREADS, ``cores`` being the CPUs this process may run on (its
affinity mask: a SLURM allocation or taskset, not the whole machine); --threads-per-job sets
the number instead. A worker computes what a sweep run alone with that many threads computes.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowvae import runlock
from flowvae.config import Config
from flowvae.errors import FlowvaeError, RunFolderBusy, TrainingError
from flowvae.sweep import UNLOCKED, GridPoint, SweepResult, run_status

#: The environment variable that hands a worker its run folder's lock: the descriptor number.
LOCK_ENV = "FLOWVAE_RUN_LOCK"
LOG_NAME = "log.txt"


def cores() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_job(jobs: int, runs: int, override: int | None = None) -> int:
    """Each of the ``min(jobs, runs)`` workers that can run at once gets an equal share."""
    if override is not None:
        return override
    return max(1, cores() // max(1, min(jobs, runs)))


class GridInterrupted(FlowvaeError):
    """SIGINT/SIGTERM reached a parallel sweep: its workers saved their runs and stopped."""

    def __init__(self, signum: int, stopped: int) -> None:
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}: {stopped} running run(s) saved "
            "their checkpoints — run the same sweep command to resume them"
        )


def become_worker(run_dir: Path) -> None:
    """In a worker: take over the lock its parent passed down, and ask the kernel (Linux) to
    send SIGTERM when the parent dies, so that a killed sweep leaves no run training unseen
    (SIGTERM: the run saves last.pt, and the next sweep resumes it)."""
    fd = os.environ.get(LOCK_ENV)
    if fd is None or not fd.isdigit():
        return  # started by hand: the sweep takes the lock itself
    runlock.adopt(run_dir, int(fd))
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Job:
    name: str
    run_dir: Path
    proc: subprocess.Popen
    hold: contextlib.ExitStack  # the run folder's lock and the log file
    started: float = field(default_factory=time.monotonic)


class GridDisplay:
    """One display for the grid: a progress bar with runs done / running / left and an ETA on
    a terminal, else a line per event with the same counts."""

    def __init__(self, total: int, log: Callable[[str], None], progress) -> None:
        self.total, self.done, self.log, self.bar = total, 0, log, progress
        self.failed = 0
        self.ran: list[float] = []  # seconds of the runs this sweep ran to the end
        self.start = time.monotonic()
        self.task = None
        if progress is not None:
            self.task = progress.add_task(self.counts(0), total=total)

    def counts(self, running: int) -> str:
        left = self.total - self.done - self.failed - running
        failed = f" · {self.failed} failed" if self.failed else ""
        return f"{self.done}/{self.total} done · {running} running · {left} left{failed}"

    def eta(self, running: list[Job], jobs: int) -> str:
        if not self.ran:
            return "ETA ?"
        mean = sum(self.ran) / len(self.ran)
        now = time.monotonic()
        left = self.total - self.done - self.failed - len(running)
        work = left * mean + sum(max(mean - (now - j.started), 0.0) for j in running)
        return f"ETA {_duration(work / max(1, jobs))}"

    def status(self, running: list[Job], jobs: int) -> str:
        return f"{self.counts(len(running))} · {self.eta(running, jobs)}"

    def event(self, message: str, running: list[Job], jobs: int) -> None:
        if self.bar is None:
            self.log(f"[{self.status(running, jobs)}] {message}")
            return
        self.tick(running, jobs)
        self.bar.console.print(message, highlight=False, soft_wrap=True)

    def tick(self, running: list[Job], jobs: int) -> None:
        """Bring the bar's counts and ETA up to date (a line per event has no bar)."""
        if self.bar is not None:
            status = self.status(running, jobs)
            self.bar.update(self.task, completed=self.done, description=status)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Scheduler:
    """Runs ``todo`` on ``jobs`` workers; ``worker_args(name)`` is the CLI arguments (after
    ``python -m flowvae``) of the worker for one run."""

    todo: list[tuple[GridPoint, Config]]
    out_root: Path
    jobs: int
    threads: int
    worker_args: Callable[[str], list[str]]
    complete: Callable[[dict], bool]
    display: GridDisplay
    running: list[Job] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # run, its last line
    caught: list[int] = field(default_factory=list)
    stopped: int = 0  # workers a signal stopped

    @property
    def stopping(self) -> bool:
        return bool(self.caught or self.failed)

    def run(self) -> SweepResult:
        with self._signals_caught():
            busy = self._drain(collections.deque(self.todo))
            # Come back once to the runs others held: finished by now, or freed by a holder
            # that died (then resumed here).
            left = self._drain(collections.deque(busy)) if busy and not self.stopping else busy
        if self.caught:
            raise GridInterrupted(self.caught[0], self.stopped)
        if self.failed:
            name, said = self.failed[0]
            others = f" (and {', '.join(n for n, _ in self.failed[1:])})" if self.failed[1:] else ""
            raise TrainingError(
                f"sweep: {name}{others} failed, so no further run was started; {name} said: "
                f"{said} — see {self.out_root / name / LOG_NAME}"
            )
        return SweepResult(
            [self.out_root / p.name for p, _ in self.todo],
            [self.out_root / p.name for p, _ in left],
        )

    def _drain(self, queue: collections.deque) -> list[tuple[GridPoint, Config]]:
        """Start runs while workers are free, until the queue is empty and all have ended;
        returns the runs another process held."""
        busy = []
        # Like a sweep of one run at a time, a failed run stops the grid: the runs started
        # are finished, and no more are started (a cause such as a wrong device would fail
        # every one of them).
        while (queue and not self.stopping) or self.running:
            while queue and len(self.running) < self.jobs and not self.stopping:
                point, cfg = queue.popleft()
                if not self._start(point, cfg):
                    busy.append((point, cfg))
            self._reap()
            self.display.tick(self.running, self.jobs)
            time.sleep(0.1)
        return busy

    def _start(self, point: GridPoint, cfg: Config) -> bool:
        """Lock the run and start its worker (or count it done); False if another holds it."""
        run_dir = self.out_root / point.name
        hold = contextlib.ExitStack()
        try:
            hold.enter_context(runlock.hold_run_folder(run_dir))
        except RunFolderBusy:
            info = runlock.holder(run_dir) or {}
            self.display.event(
                f"{point.name}: being written by pid {info.get('pid', '?')} — passed over",
                self.running,
                self.jobs,
            )
            return False
        with hold:
            if runlock.unlocked(run_dir):
                self.display.event(f"warning: {run_dir} cannot be locked here, so {UNLOCKED}",
                                   self.running, self.jobs)  # fmt: skip
            if run_status(run_dir, cfg.train.steps, self.complete) == "done":
                self.display.done += 1
                self.display.event(f"{point.name}: done", self.running, self.jobs)
                return True
            self.running.append(self._spawn(point.name, run_dir, hold.pop_all()))
        self.display.event(
            f"{point.name}: started ({self.threads} thread(s); log {run_dir / LOG_NAME})",
            self.running,
            self.jobs,
        )
        return True

    def _spawn(self, name: str, run_dir: Path, hold: contextlib.ExitStack) -> Job:
        fd = runlock.held_descriptor(run_dir)
        log = hold.enter_context(open(run_dir / LOG_NAME, "ab"))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"== {stamp} flowvae sweep worker, {self.threads} thread(s) ==\n".encode())
        log.flush()
        threads = str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env[LOCK_ENV] = str(fd)
        env.setdefault("COLUMNS", "120")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flowvae", *self.worker_args(name)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(fd,),
            )
        except BaseException:
            hold.close()
            raise
        return Job(name, run_dir, proc, hold)

    def _reap(self) -> None:
        for job in [j for j in self.running if j.proc.poll() is not None]:
            self.running.remove(job)
            job.hold.close()  # the log file, then the lock
            code = job.proc.returncode
            if code == 0:
                self.display.done += 1
                self.display.ran.append(time.monotonic() - job.started)
                message = f"{job.name}: finished in {_duration(time.monotonic() - job.started)}"
            elif self.caught:
                self.stopped += 1
                message = f"{job.name}: stopped (exit {code}); resumes on the next sweep"
            else:
                self.failed.append((job.name, _last_line(job.run_dir)))
                self.display.failed += 1
                message = f"{job.name}: failed (exit {code}) — see {job.run_dir / LOG_NAME}"
            self.display.event(message, self.running, self.jobs)

    @contextlib.contextmanager
    def _signals_caught(self):
        """SIGINT/SIGTERM: start nothing more and pass the signal on to the workers (a
        terminal's Ctrl-C reaches them anyway; a second one costs nothing), which save their
        runs and exit; then the sweep stops."""

        def handler(signum, _frame):
            self.caught.append(signum)
            for job in self.running:
                with contextlib.suppress(ProcessLookupError):
                    job.proc.send_signal(signum)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                if h is not None:
                    signal.signal(s, h)
            for job in self.running:  # an exception here: leave no worker behind
                job.proc.terminate()
                job.proc.wait()
                job.hold.close()


def _last_line(run_dir: Path) -> str:
    try:
        lines = (run_dir / LOG_NAME).read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1][:160] if lines else "no output"


def parallel_sweep(
    todo: list[tuple[GridPoint, Config]],
    out_root: Path,
    jobs: int,
    threads: int | None,
    worker_args: Callable[[str], list[str]],
    complete: Callable[[dict], bool],
    log: Callable[[str], None],
    progress=None,  # a rich Progress for the grid's bar, or None for a line per event
) -> SweepResult:
    """``todo`` (a prepared grid, see flowvae.sweep.prepare) on ``jobs`` workers."""
    threads = threads_per_job(jobs, len(todo), threads)
    log(f"sweep: {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
    display = GridDisplay(len(todo), log, progress)
    scheduler = Scheduler(todo, out_root, jobs, threads, worker_args, complete, display)
    with progress if progress is not None else contextlib.nullcontext():
        return scheduler.run()
