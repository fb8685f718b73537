"""Run a grid of configs one after another: skip finished runs, resume interrupted ones,
and leave an ``eval.json`` in each run folder for `flowvae report`."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowvae import checkpoint
from flowvae.config import Config, load_config, parse_override
from flowvae.errors import CheckpointError, ConfigError, RunFolderBusy
from flowvae.resume import CONTINUABLE, config_changes  # noqa: F401  (re-exported)
from flowvae.runlock import LOCK_NAME, hold_run_folder, holder, unlocked
from flowvae.tidy import NewPaths, removed_on_failure


@dataclass
class GridPoint:
    name: str
    overrides: list[str]


def parse_grid(specs: list[str]) -> list[GridPoint]:
    """['flow.k=0,2,10', 'flow.name=planar,nice'] -> the Cartesian product of the values."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(
                f"--grid {spec!r} must look like key=v1,v2,... e.g. --grid flow.k=0,2,10"
            )
        key, values = spec.split("=", 1)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"--grid {spec!r} lists no values")
        parse_override(f"{key}={items[0]}")  # same key syntax as --set
        axes.append((key.strip(), items))
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        overrides = [f"{key}={value}" for (key, _), value in zip(axes, combo)]
        name = "-".join(_label(key, value) for (key, _), value in zip(axes, combo))
        points.append(GridPoint(name or "run", overrides))
    return points


def _label(key: str, value: str) -> str:
    """Folder-name part for one grid value: 'planar' for flow.name, 'k10' for flow.k."""
    last = key.split(".")[-1]
    text = value if last == "name" else f"{last}{value}"
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in text)


def run_status(run_dir: Path, steps: int, complete: Callable[[dict], bool] = bool) -> str:
    """'done' (trained, and evaluated as ``complete`` wants), 'trained', 'partial' or 'new'."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return "new"
    try:
        step = int(checkpoint.load(last)["step"])
    except CheckpointError:  # damaged: --resume falls back to an intact checkpoint, or says why
        return "partial"
    if step < steps:
        return "partial"
    previous = read_eval(run_dir)
    return "done" if previous is not None and complete(previous) else "trained"


def read_eval(run_dir: Path) -> dict | None:
    """A run folder's eval.json; None when there is none, or it is not a JSON object (a write
    cut short by hand, e.g. `eval --json > eval.json`), so that it is evaluated afresh."""
    path = run_dir / "eval.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def merge_eval(previous: dict | None, result: dict, headline: bool = True) -> dict:
    """``result`` recorded into an eval.json that held ``previous``.

    A VAE estimate of the same split and weights (step) joins it: as the headline (keeping the
    estimates at other S in ``by_samples``), or, with ``headline`` false, as ``by_samples[S]``.
    Anything else (another split, other weights, a density run) replaces it."""
    if (
        previous is None
        or result.get("iw_samples") is None
        or previous.get("split", result.get("split")) != result.get("split")
        or previous.get("step", result.get("step")) != result.get("step")
        or previous.get("limit") != result.get("limit")  # other images
    ):
        return result
    if headline:
        return {**result, "by_samples": previous.get("by_samples", {})}
    extra = {**previous.get("by_samples", {}), str(result["iw_samples"]): result}
    return {**previous, "by_samples": extra}


def record_eval(run_dir: Path, result: dict) -> Path:
    """Merge one `flowvae eval` result into ``run_dir``/eval.json (atomically), as a sweep
    does: it is the headline unless the file already heads another S of the same split."""
    previous = read_eval(run_dir)
    headline = previous is None or previous.get("iw_samples") in (None, result.get("iw_samples"))
    save_eval(run_dir, merge_eval(previous, result, headline))
    return run_dir / "eval.json"


def plan(configs: list[str | Path], grid: list[str]) -> list[tuple[str | Path, GridPoint]]:
    """Every config crossed with every grid point. A run folder is named after its grid point
    when one config is swept over a grid, else after its config file (and grid point)."""
    points = parse_grid(grid)
    if len(configs) == 1 and grid:
        return [(configs[0], p) for p in points]
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) < len(stems):
        raise ConfigError(
            "sweep: two configs share a file name, so their runs would share a folder — rename one"
        )
    return [
        (config, GridPoint(stem if not grid else f"{stem}-{p.name}", p.overrides))
        for config, stem in zip(configs, stems)
        for p in points
    ]


@dataclass
class EvalsWanted:
    """What a sweep asks of each run's eval.json: estimates on ``split`` at the headline
    sample size ``first`` (a VAE run's S; None for density runs) and at each of ``more``, on
    the split's first ``limit`` images (None: all of them)."""

    split: str
    first: int | None
    more: list[int]
    limit: int | None = None

    def missing(self, result: dict) -> list[int]:
        """The extra sample sizes a VAE run's eval.json lacks (density runs have none)."""
        if result.get("iw_samples") is None:
            return []
        return [s for s in self.more if str(s) not in result.get("by_samples", {})]

    def usable(self, result: dict | None) -> bool:
        """An earlier eval.json of this split, with the per-image estimates that the report
        pairs (a VAE run's eval.json from before they were kept lacks them)."""
        if result is None or result.get("split", self.split) != self.split:
            return False
        if result.get("iw_samples") is None:
            return True
        return "nll_per_image" in result and result.get("limit") == self.limit

    def complete(self, result: dict) -> bool:
        return self.usable(result) and not self.missing(result)

    def fill(
        self,
        previous: dict | None,
        evaluate: Callable[[int | None], dict],
        save: Callable[[dict], None],
    ) -> dict:
        """``previous`` with what it lacks computed by ``evaluate`` (S -> one eval result),
        handed to ``save`` after each evaluation, so that an interrupted S = 5,000 keeps the
        S = 200 before it; the extra S an earlier sweep computed on this split are kept."""
        if self.usable(previous):
            result = previous
        else:
            result = evaluate(self.first)
            if result.get("iw_samples") is not None:  # a VAE run: say which images were scored
                result["limit"] = self.limit
            result = merge_eval(previous, result)
            save(result)
        for s in self.missing(result):
            result = merge_eval(result, evaluate(s), headline=False)  # the same images
            save(result)
        return result


def save_eval(run_dir: Path, result: dict) -> None:
    checkpoint.write_text_atomic(run_dir / "eval.json", json.dumps(result) + "\n")


@dataclass(frozen=True)
class GridShard:
    """Part ``index`` of ``count`` of a grid: the points whose position in the expanded grid is
    ``index`` modulo ``count``. Round robin rather than blocks, so that a grid ordered by depth
    gives every part a share of the long runs."""

    index: int
    count: int

    def take(self, items: list) -> list:
        return items[self.index :: self.count]


def parse_shard(text: str) -> GridShard:
    """'2/9' -> GridShard(2, 9); anything else is a one-line ConfigError."""
    head, sep, tail = text.strip().partition("/")
    if sep and head.isdigit() and tail.isdigit() and int(head) < int(tail):
        return GridShard(int(head), int(tail))
    raise ConfigError(
        f"--shard {text!r} must be I/N with 0 <= I < N, e.g. --shard 0/9 for the first of nine "
        "parts (SLURM: --shard $SLURM_ARRAY_TASK_ID/9 with --array=0-8)"
    )


def prepare(
    configs: list[str | Path],
    grid: list[str],
    out_root: Path,
    overrides: list[str],
    shard: GridShard | None = None,
    log: Callable[[str], None] | None = None,  # says when this shard holds no run
) -> list[tuple[GridPoint, Config]]:
    """The grid's points and their configs (this shard's part of them), each checked against
    the run folder it would continue. Every point of the whole grid is validated, so that a
    typo fails every shard at once rather than wasting hours in one of them."""
    planned = plan(configs, grid)
    points = [p for _, p in planned]
    loaded = [load_config(config, overrides + p.overrides) for config, p in planned]
    for point, cfg in zip(points, loaded):
        if changes := config_changes(out_root / point.name, cfg):
            more = f" (+{len(changes) - 2} more)" if len(changes) > 2 else ""
            raise ConfigError(
                f"sweep: {out_root / point.name} was trained with another config "
                f"({'; '.join(changes[:2])}{more}) — move that folder away, or choose another --out"
            )
    pairs = list(zip(points, loaded))
    if shard is None:
        return pairs
    if not shard.take(pairs) and log is not None:
        log(f"shard {shard.index}/{shard.count} holds none of this grid's {len(pairs)} runs")
    return shard.take(pairs)


#: What a sweep says where a run folder cannot be locked (see flowvae.runlock).
UNLOCKED = (
    "two sweeps on this --out could train the same run at once — give each its own "
    "--shard, or run one sweep (docs/clusters.md)"
)


@dataclass
class SweepResult:
    runs: list[Path]  # this sweep's part of the grid
    busy: list[Path]  # runs another process was writing when this one last came to them


def sweep(
    configs: list[str | Path],
    grid: list[str],
    out_root: Path,
    overrides: list[str],
    train_fn: Callable,
    # run folder, its eval.json, a saver -> the new eval.json, saved as each part is done
    eval_fn: Callable[[Path, dict | None, Callable[[dict], None]], dict],
    log: Callable[[str], None] = print,
    complete: Callable[[dict], bool] = bool,  # whether an eval.json holds all that is asked
    shard: GridShard | None = None,
    only: str | None = None,  # one point's name: the run a parallel sweep hands a worker
) -> SweepResult:
    """Each run of the grid in turn, under its own folder's lock: a run that another sweep
    (here or on another machine sharing the folder) is writing is passed over, and looked at
    once more after the others, when it may have finished, or been freed by a holder that
    died (then this sweep resumes it)."""
    todo = prepare(configs, grid, out_root, overrides, shard, log)
    if only is not None:
        todo = [(p, c) for p, c in todo if p.name == only]
        if not todo:
            raise ConfigError(f"sweep: no run named {only!r} in this grid")
    if not todo:  # an empty shard: nothing to write
        return SweepResult([], [])
    step = functools.partial(run_point, train_fn=train_fn, eval_fn=eval_fn, complete=complete)
    busy = []
    # A sweep that fails before any run is kept leaves no --out folder (others may share it, so
    # it goes only while empty).
    with removed_on_failure(
        NewPaths(out_root), keep=lambda: out_root.is_dir() and any(out_root.iterdir())
    ):
        out_root.mkdir(parents=True, exist_ok=True)
        for i, (point, cfg) in enumerate(todo, 1):
            if not step(out_root / point.name, cfg, log=_prefixed(log, f"[{i}/{len(todo)}]")):
                busy.append((point, cfg))
        left = [
            out_root / p.name
            for p, cfg in busy
            if not step(out_root / p.name, cfg, log=_prefixed(log, "[again]"))
        ]
    return SweepResult([out_root / p.name for p, _ in todo], left)


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda message: log(f"{prefix} {message}")


def run_point(
    run_dir: Path,
    cfg: Config,
    train_fn: Callable,
    eval_fn: Callable[[Path, dict | None, Callable[[dict], None]], dict],
    complete: Callable[[dict], bool],
    log: Callable[[str], None],
) -> bool:
    """Train and evaluate one run as far as it still needs, holding its folder's lock; False
    (and nothing written) when another process holds it."""
    new = NewPaths(run_dir)
    kept = lambda: any(p.name != LOCK_NAME for p in new.added())  # noqa: E731
    with contextlib.ExitStack() as stack:
        # entered first, so it runs after the lock is let go: a run that failed before writing
        # anything a user needs leaves no folder
        stack.enter_context(removed_on_failure(new, kept))
        try:
            stack.enter_context(hold_run_folder(run_dir))
        except RunFolderBusy:
            info = holder(run_dir) or {}
            log(f"{run_dir.name}: being written by pid {info.get('pid', '?')} — passed over")
            return False
        if unlocked(run_dir):
            log(f"warning: {run_dir} cannot be locked here, so {UNLOCKED}")
        status = run_status(run_dir, cfg.train.steps, complete)
        log(f"{run_dir.name}: {status}")
        previous = read_eval(run_dir)
        if status in ("new", "partial"):
            train_fn(cfg, run_dir, resume=status == "partial")
            status, previous = "trained", None  # an older eval.json is of older weights
        if status == "trained":
            eval_fn(run_dir, previous, functools.partial(save_eval, run_dir))
            log(f"{run_dir.name}: evaluated")
    return True
