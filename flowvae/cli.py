"""The flowvae command line: a thin layer over the library.

flowvae train --config configs/energy.yaml [--set flow.k=8] [--out DIR] [--resume]
flowvae eval  runs/NAME/checkpoints/best.pt [--json]
flowvae sample runs/NAME/checkpoints/best.pt --out figure.png
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from flowvae import __version__
from flowvae.errors import ConfigError, FlowvaeError, Interrupted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help=(
        "Variational inference with normalizing flows (Rezende & Mohamed, 2015).\n\n"
        "Fit planar, radial, NICE and later flows to the paper's 2-D energies U1..U4, or train "
        "a flow VAE on an image dataset (binarised MNIST, CIFAR-10 patches, ...; `flowvae list`), "
        "from a YAML config. Start with:\n\n"
        "  flowvae train --config configs/energy.yaml\n\n"
        "  flowvae eval runs/U1-planar-k32-s0/checkpoints/best.pt\n\n"
        "  flowvae sample runs/U1-planar-k32-s0/checkpoints/best.pt --out fig.png"
    ),
)
err = Console(stderr=True)
out = Console()


def user_errors(fn):
    """Print a FlowvaeError as one line on stderr and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowvaeError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (RuntimeError, MemoryError) as exc:
            from flowvae.memory import is_out_of_memory, out_of_memory

            if not is_out_of_memory(exc):
                raise
            message = str(out_of_memory(exc, "the sizes asked for (--n, --samples, --max-rows)"))
            err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Interrupted as exc:
            err.print(
                f"[yellow]interrupted[/] at step {exc.step}; checkpoint saved to {exc.path} — "
                f"resume with {exc.resume_hint}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"flowvae {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


@app.command()
@user_errors
def train(
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="A YAML file, or a shipped config by name (`flowvae configs`)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override a key, value parsed as YAML: --set flow.k=8 --set model.hidden=[400,400]. Repeatable.",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run folder (default: runs/<target|data>-<flow>-k<K>-s<seed>)."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu or cuda (overrides the config).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out exactly as its config.yaml says (--config/--set may "
            "only repeat it; train.steps may grow under a constant lr_schedule).",
        ),
    ] = False,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Train a flow: density matching on U1..U4, or a flow VAE on a dataset.

    The run folder gets config.yaml, checkpoints/last.pt and best.pt, metrics.jsonl and
    TensorBoard logs (tensorboard --logdir runs). Ctrl-C saves last.pt, and --resume continues
    exactly where the run stopped, with the run's own config.yaml: `flowvae train --out RUN
    --resume`. A --config or --set that changes the stored run is refused, except train.steps
    growing under a constant learning rate (the run goes on at that rate; config.yaml and
    run.json then say the new length). A cosine decay is laid out over train.steps, so such a
    run cannot be lengthened: train a new one.
    """
    from flowvae.config import load_config
    from flowvae.experiments import EXPERIMENTS
    from flowvae.resume import resume_config
    from flowvae.run_folder import default_out_dir
    from flowvae.train import train as run_training

    overrides = list(set_ or [])
    if device is not None:
        overrides.append(f"device={device}")
    if config is None and not resume:
        raise ConfigError(
            "train needs a config: --config NAME or --config FILE.yaml (`flowvae configs` lists "
            "the shipped ones, e.g. --config energy)"
        )
    if resume and out_dir is None and config is None:
        raise ConfigError("--resume needs --out RUN, the run folder to continue")
    target = out_dir or default_out_dir(load_config(config, overrides))
    cfg = resume_config(target, config, overrides) if resume else load_config(config, overrides)

    def banner(cfg, target) -> None:  # printed only once the run's checks have passed
        what = EXPERIMENTS.get(cfg.experiment).label(cfg)
        err.print(
            f"[bold]flowvae[/] {cfg.experiment} · {what} · {cfg.flow.name} K={cfg.flow.k} · "
            f"{cfg.train.steps} steps → {target}",
            highlight=False,
        )

    result = run_training(
        cfg, target, resume=resume, console=err, progress=not no_progress, on_start=banner
    )
    score = getattr(EXPERIMENTS.get(cfg.experiment), "score_label", "validation score")
    err.print(
        f"done: {result.step} steps in {result.seconds:.1f} s; best {score} "
        f"{result.best_score:.4g} nats; checkpoints in {result.out_dir / 'checkpoints'}",
        highlight=False,
    )


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command("eval")
@user_errors
def evaluate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint, e.g. runs/NAME/checkpoints/best.pt.")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
    samples: Annotated[
        int | None, typer.Option("--samples", min=2, help="Density runs: samples for KL(q‖p).")
    ] = None,
    iw_samples: Annotated[
        int | None,
        typer.Option(
            "--iw-samples", min=1, help="VAE runs: importance samples per image (default 200)."
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="VAE runs: test or valid.")] = "test",
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="VAE runs: evaluate only the first N images."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    data_root: Annotated[
        str | None,
        typer.Option("--data-root", help="VAE runs: the dataset's folder (npz: the file)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the evaluation's samples.")] = 0,
    psis: Annotated[
        bool,
        typer.Option("--psis", help="VAE runs: also the Pareto-smoothed -log p(x) (nll_psis)."),
    ] = False,
    max_rows: Annotated[
        int | None,
        typer.Option(
            "--max-rows",
            min=1,
            help="VAE runs: decoder rows per pass (default 4000 on CPU, 65536 on CUDA); "
            "lower it if memory is short.",
        ),
    ] = None,
) -> None:
    """Evaluate a checkpoint: KL(q‖p), or -ELBO and importance-sampled -log p(x).

    Density runs report KL(q‖p) in nats against the exact normaliser. VAE runs report -ELBO and
    -log p(x) with S importance samples per image, and whether S was enough: the Pareto k̂ of
    each image's weights (above 0.7 the estimate cannot be trusted; the share of such images
    is reported, with a warning when it is over 1%) and their effective sample size.

    Under `torchrun --nproc_per_node N -m flowvae eval ...` the images are spread over N
    processes, with the same numbers as one process.

    The result is also recorded in the run folder's eval.json (for `flowvae report`), merged
    as `flowvae sweep` merges: another S of the same split and checkpoint step joins the file,
    anything else replaces it.
    """
    from flowvae import distributed
    from flowvae.device import resolve_device
    from flowvae.experiments import EvalOptions
    from flowvae.runs import evaluate, load_run, run_folder_of
    from flowvae.sweep import record_eval

    check_split(split)
    given = {
        "--samples": samples is not None,
        "--iw-samples": iw_samples is not None,
        "--split": split != "test",
        "--limit": limit is not None,
        "--data-root": data_root is not None,
        "--psis": psis,
        "--max-rows": max_rows is not None,
    }
    # Under torchrun every process evaluates its share of the images; rank 0 reports.
    shard, dev = distributed.init_eval(resolve_device(device))
    try:
        run = load_run(
            checkpoint,
            device=str(dev),
            data_root=data_root,
            check=lambda kind: check_applies(given, kind, "eval"),
        )
        options = EvalOptions(
            samples=samples,
            iw_samples=iw_samples,
            split=split,
            limit=limit,
            seed=seed,
            max_rows=max_rows,
            psis=psis,
            shard=shard,
        )
        quiet = (as_json and not sys.stderr.isatty()) or not shard.is_main
        with Progress(console=err, transient=True, disable=quiet) as bar:
            task = bar.add_task("eval", total=None)
            options.progress = lambda done, total: bar.update(task, completed=done, total=total)
            result = evaluate(run, options)
    finally:
        distributed.finish()
    if not shard.is_main:
        return
    if "warning" in result:
        err.print(f"[yellow]warning:[/] {result['warning']}", highlight=False, soft_wrap=True)
    run_dir = run_folder_of(checkpoint)
    if run_dir is not None:
        err.print(f"recorded in {record_eval(run_dir, result)}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    out.print(str(checkpoint), highlight=False, soft_wrap=True)  # a path is never wrapped
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in run.experiment.eval_keys + ["seconds"]:
        if key in result:
            table.add_row(key, _fmt(result[key]))
    out.print(table)


@app.command()
@user_errors
def sample(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint, e.g. runs/NAME/checkpoints/best.pt.")
    ],
    n: Annotated[
        int | None,
        typer.Option(
            "--n", "-n", min=1, help="Number of samples (default: 10,000 density, 64 VAE)."
        ),
    ] = None,
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help=".png (picture) or .npz (arrays).")
    ] = Path("samples.png"),
    reconstruct: Annotated[
        bool,
        typer.Option("--reconstruct", help="VAE runs: test images beside their reconstructions."),
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    data_root: Annotated[
        str | None,
        typer.Option("--data-root", help="VAE runs: the dataset's folder (npz: the file)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the samples.")] = 0,
) -> None:
    """Draw samples from a checkpoint, as a picture (.png) or arrays (.npz).

    Density runs: the .png shows q_K beside the target (the paper's Figure 3), and the .npz holds
    z (N×2) and log_q (N). VAE runs: the .png is a grid of decoded prior samples (with
    --reconstruct, test images beside their reconstructions), and the .npz holds the arrays.
    """
    from flowvae.experiments import SampleOptions
    from flowvae.outputs import check_output_file, writing
    from flowvae.runs import load_run

    suffix = out_file.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise ConfigError(f"--out {out_file}: use a .png or .npz file name")
    check_output_file(out_file, "--out", "samples.png")
    given = {"--reconstruct": reconstruct, "--data-root": data_root is not None}
    check = lambda kind: check_applies(given, kind, "sample")  # noqa: E731
    run = load_run(checkpoint, device=device, data_root=data_root, check=check)
    with writing(out_file, "--out"):
        run.experiment.sample(SampleOptions(n, out_file, seed, reconstruct))
    err.print(f"wrote {out_file}", highlight=False)


@app.command()
@user_errors
def posterior(
    checkpoint: Annotated[
        Path, typer.Argument(help="A VAE checkpoint with a 2-D latent space (--config mnist_2d).")
    ],
    images: Annotated[
        str, typer.Option("--images", help="Image indices: 0,7,42 or a range 0-19.")
    ] = "0,7,42",
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="The picture (.png); none with --json alone.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each image's numbers as one JSON object.")
    ] = False,
    grid: Annotated[int, typer.Option("--grid", min=16, help="Grid cells per side.")] = 200,
    iw_samples: Annotated[
        int,
        typer.Option("--iw-samples", min=0, help="Importance samples for log p(x) (0: skip)."),
    ] = 5000,
    split: Annotated[str, typer.Option("--split", help="test or valid.")] = "test",
    data_root: Annotated[
        str | None, typer.Option("--data-root", help="The dataset's folder (npz: the file).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the q_K samples.")] = 0,
) -> None:
    """Draw q_K(z|x) beside the true posterior p(z|x) of a VAE with a 2-D latent space.

    For each image: p(z|x) ∝ p(x|z)p(z) on a grid normalised numerically, q_0(z|x) and q_K(z|x)
    from the flow's exact density on the same grid, the true posterior's contours over each,
    and the image and its reconstruction. --json gives per image log p(x) from the grid and by
    importance sampling, KL(q_K‖p(z|x)) and KL(p(z|x)‖q_K) from the grid, and the grid's mass
    of q_K (1 when the grid holds it).
    """
    from flowvae import posterior as post
    from flowvae.errors import ConfigError
    from flowvae.runs import load_run

    check_split(split)
    indices = post.parse_indices(images)
    if out_file is None and not as_json:
        out_file = Path("posterior.png")
    if out_file is not None and out_file.suffix.lower() != ".png":
        raise ConfigError(f"--out {out_file}: use a .png file name")
    if out_file is not None and not out_file.parent.exists():
        raise ConfigError(f"--out {out_file}: folder {out_file.parent} does not exist")
    run = load_run(checkpoint, device="cpu", data_root=data_root)
    rows = post.view(run.experiment, indices, split, grid, iw_samples, seed)
    if out_file is not None:
        from flowvae.plots import save_figure
        from flowvae.posterior_figure import posterior_figure

        shape = run.experiment.data.image_shape
        save_figure(posterior_figure(rows, shape, run.cfg.flow.k), out_file)
        err.print(f"wrote {out_file}", highlight=False)
    if as_json:
        about = {"checkpoint": str(checkpoint), "flow": run.cfg.flow.name, "k": run.cfg.flow.k}
        about |= {"split": split, "step": int(run.ckpt["step"]), "grid": grid}
        sys.stdout.write(json.dumps(post.as_json(rows, **about)) + "\n")


@app.command()
@user_errors
def sweep(
    config: Annotated[
        list[str],
        typer.Option(
            "--config",
            "-c",
            help="Base config: a YAML file or a shipped config's name. Repeat it (--config "
            "a.yaml --config b.yaml) for one run per config, each folder named after its file.",
        ),
    ],
    out_root: Annotated[
        Path, typer.Option("--out", "-o", help="Folder that gets one run folder per grid point.")
    ],
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            help="key=v1,v2,... ; repeat for a Cartesian product, e.g. --grid flow.k=0,10,40",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override applied to every run.")
    ] = None,
    iw_samples: Annotated[
        list[int] | None,
        typer.Option(
            "--iw-samples",
            min=1,
            help="VAE runs: IS samples for eval. Repeat it (--iw-samples 200 --iw-samples 5000) "
            "for an estimate at each; the first is the headline.",
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", min=2, help="Density runs: samples for eval.")
    ] = None,
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            help="Which checkpoint each run's eval.json evaluates: best (chosen on validation "
            "data) or last.",
        ),
    ] = "best",
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="VAE runs: evaluate on test, or on valid (to compare settings without looking "
            "at the test set).",
        ),
    ] = "test",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="VAE runs: evaluate only the first N images."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Runs at once, each in a process of its own with its output in RUN/log.txt.",
        ),
    ] = 1,
    threads_per_job: Annotated[
        int | None,
        typer.Option(
            "--threads-per-job",
            min=1,
            help="Threads of each run (default: the CPUs this process may use, divided "
            "equally between the runs that run at once).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: only part I of N of the grid (runs I, I+N, I+2N, ...), e.g. "
            "--shard $SLURM_ARRAY_TASK_ID/9 in a job array.",
        ),
    ] = None,
    point: Annotated[str | None, typer.Option("--point", hidden=True)] = None,
) -> None:
    """Train and evaluate a grid of runs: one after another, or --jobs N at a time.

    Finished runs are skipped and interrupted ones resumed, so running the same command again
    continues the sweep. A run folder trained with another config is refused rather than
    reported under this one; only the device may differ, and train.steps may grow for a
    constant learning rate (a cosine decay is laid out over the run's length). Each run folder
    gets an eval.json for `flowvae report`.

    Each run is locked on its own (RUN/.lock), so several sweeps on one --out, on this machine
    or on machines sharing the folder, divide the grid: a run another sweep is writing is passed
    over (looked at once more at the end, and named if still busy), and an interrupted one is
    resumed by whichever sweep comes to it. --shard splits the grid in fixed parts instead.

    With --jobs N each run gets the CPUs this process may use divided by the runs that run at
    once (at least one thread; --threads-per-job sets it), and gives the numbers it gives when
    run alone with that many threads.
    """
    from flowvae.experiments import EvalOptions
    from flowvae.runs import evaluate, load_run
    from flowvae.sweep import EvalsWanted, parse_shard, prepare
    from flowvae.sweep import sweep as run_sweep
    from flowvae.sweep_jobs import become_worker, parallel_sweep
    from flowvae.train import train as run_training

    def train_fn(cfg, run_dir, resume):
        try:
            run_training(cfg, run_dir, resume=resume, console=err, progress=not no_progress)
        except Interrupted as exc:
            exc.resume_hint = "the same sweep command (finished runs are skipped)"
            raise

    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint {checkpoint!r} is not allowed (choices: best, last)")
    check_split(split)

    first, *more = iw_samples or [None]
    wanted = EvalsWanted(split, first, more, limit)
    parts = parse_shard(shard) if shard is not None else None
    log = lambda m: err.print(m, highlight=False, soft_wrap=True)  # noqa: E731

    def eval_fn(run_dir: Path, previous: dict | None, save):
        run = load_run(run_dir / "checkpoints" / f"{checkpoint}.pt")
        options = lambda s: EvalOptions(  # noqa: E731
            samples=samples, iw_samples=s, split=split, limit=limit
        )
        return wanted.fill(previous, lambda s: evaluate(run, options(s)), save)

    def worker_args(name: str) -> list[str]:  # this command, for one run (--point)
        given = [
            ("--config", config),
            ("--grid", grid),
            ("--set", set_),
            ("--iw-samples", iw_samples),
        ]
        given += [("--samples", [samples]), ("--limit", [limit]), ("--point", [name])]
        flags = [f"{flag}={v}" for flag, values in given for v in values or [] if v is not None]
        return ["sweep", f"--out={out_root}", f"--checkpoint={checkpoint}", f"--split={split}",
                "--no-progress", *flags]  # fmt: skip

    if point is not None:
        become_worker(out_root / point)
    if jobs > 1 and point is None:
        todo = prepare(config, grid or [], out_root, list(set_ or []), parts, log)
        bar = None if no_progress or not err.is_terminal else _grid_bar()
        args = (jobs, threads_per_job, worker_args, wanted.complete, log, bar)
        result = parallel_sweep(todo, out_root, *args)
    else:
        if threads_per_job is not None:
            import torch

            torch.set_num_threads(threads_per_job)
        result = run_sweep(
            config,
            grid or [],
            out_root,
            list(set_ or []),
            train_fn,
            eval_fn,
            log=log,
            complete=wanted.complete,
            shard=parts,
            only=point,
        )
    if result.busy:
        names = ", ".join(p.name for p in result.busy)
        log(
            f"left to the other sweeps writing them (not waited for): {names} — run this sweep "
            "again, or `flowvae report`, once they finish"
        )


def _grid_bar() -> Progress:
    from rich.progress import BarColumn, TextColumn

    return Progress(TextColumn("grid"), BarColumn(), TextColumn("{task.description}"), console=err)


@app.command()
@user_errors
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run folders, or folders holding them (e.g. a sweep's --out)."),
    ],
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the Markdown here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="VAE runs: PNG of -log p(x) against K.")
    ] = None,
    figure: Annotated[
        Path | None, typer.Option("--figure", help="Density runs: the Figure-3 grid PNG.")
    ] = None,
) -> None:
    """Collect evaluated runs into Markdown tables beside the paper's numbers.

    Reads the eval.json that `flowvae eval` and `flowvae sweep` leave in each run folder. VAE runs scored on the same images are also compared image by image:
    each K against the next shorter one and the flow families at equal K, with the standard
    error of the per-image differences (far smaller than the rows' own).
    """
    from flowvae.outputs import check_output_file, writing
    from flowvae.report import report as make_report

    for p in runs:
        if not p.exists():
            raise ConfigError(f"{p} does not exist — pass run folders or a sweep folder")
    for path, option, example in (
        (out_file, "--out", "report.md"),
        (plot, "--plot", "nll_vs_k.png"),
        (figure, "--figure", "figure3.png"),
    ):
        if path is not None:
            check_output_file(path, option, example)
    with writing(out_file or plot or figure, "--out/--plot/--figure"):
        text = make_report(runs, out_file, plot, figure)
    if not text:
        raise ConfigError(
            "no evaluated runs found (folders with eval.json) — run `flowvae eval "
            "RUN/checkpoints/best.pt` or `flowvae sweep` first"
        )
    if out_file is None:
        sys.stdout.write(text + "\n")
    else:
        err.print(f"wrote {out_file}", highlight=False)


@app.command()
@user_errors
def verify(
    path: Annotated[Path, typer.Argument(help="A run folder or a checkpoint file.")],
) -> None:
    """Check a run folder or checkpoint and say what is intact.

    Checkpoints are verified against the digest stored in them; config.yaml, run.json,
    eval.json and metrics.jsonl must parse; temporary files left by a killed writer are listed.
    Exits 1 when something is corrupt, 0 when all is intact. Reads only: nothing is changed.
    """
    from flowvae.run_folder import verify as verify_folder

    if not path.exists():
        raise ConfigError(f"{path} does not exist — pass a run folder or a checkpoint file")
    rows = verify_folder(path)
    colour = {"ok": "green", "legacy": "green", "missing": "yellow", "busy": "yellow"}
    out.print(str(path), highlight=False, soft_wrap=True)  # a path is never wrapped
    table = Table(show_header=True)
    table.add_column("file")
    table.add_column("status")
    table.add_column("detail")
    for row in rows:
        shown = row.file.name if path.is_dir() else str(row.file)
        table.add_row(shown, f"[{colour.get(row.status, 'red')}]{row.status}[/]", row.detail)
    out.print(table)
    if any(row.status in ("corrupt", "stale") for row in rows):
        raise typer.Exit(1)


@app.command("list")
def list_() -> None:
    """List the registered flows, targets, datasets, likelihoods and experiments, then each
    dataset's default likelihood, split and source (`--set data.name=NAME` switches)."""
    from flowvae import flows
    from flowvae.data import DATASETS
    from flowvae.experiments import EXPERIMENTS
    from flowvae.likelihoods import LIKELIHOODS
    from flowvae.targets import TARGETS

    table = Table(show_header=True)
    table.add_column("kind")
    table.add_column("names")
    table.add_row("flows", ", ".join(flows.available()))
    table.add_row("targets", ", ".join(TARGETS.names()))
    table.add_row("datasets", ", ".join(DATASETS.names()))
    table.add_row("likelihoods", ", ".join(LIKELIHOODS.names()))
    table.add_row("experiments", ", ".join(EXPERIMENTS.names()))
    out.print(table)
    out.print(_flow_sources())
    datasets = Table(show_header=True)
    for column in ("dataset", "likelihood", "split", "source"):
        datasets.add_column(column, overflow="fold")
    for name in DATASETS.names():
        entry = DATASETS.get(name)
        datasets.add_row(name, entry.likelihood, entry.split, entry.source)
    out.print(datasets)


def _flow_sources() -> Table:
    """Each flow beside where it comes from: built-in, an installed package's entry point
    (group flowvae.flows), or a module that registered it."""
    from flowvae import flows
    from flowvae.plugins import origin

    table = Table(show_header=True)
    table.add_column("flow")
    table.add_column("from", overflow="fold")
    for name in flows.available():
        table.add_row(name, origin(flows.FLOWS, name))
    return table


@app.command()
def keys() -> None:
    """List every config key with its default and meaning, for --set and YAML files."""
    from flowvae.config import describe

    table = Table(show_header=True)
    table.add_column("key")
    table.add_column("default")
    table.add_column("meaning")
    for key, default, doc in describe():
        table.add_row(key, default, doc)
    out.print(table)


@app.command()
@user_errors
def configs(
    name: Annotated[
        str | None,
        typer.Argument(help="A shipped config's name (e.g. mnist_quick) to print it as YAML."),
    ] = None,
) -> None:
    """List the configs shipped with flowvae, or print one.

    Any of them works by name wherever a config is expected (flowvae train --config
    mnist_quick), from any folder; copy one to a file to change more than --set allows.
    """
    import yaml

    from flowvae.config import read_config, read_yaml, resolve_config, shipped_configs

    if name is not None:
        text = resolve_config(name).read_text(encoding="utf-8")
        if "extends" in read_yaml(name):
            # A copy must stand on its own: the file's own lines, then everything it inherits.
            merged = yaml.safe_dump(read_config(name), sort_keys=False)
            own = [line if line.startswith("#") else f"# {line}" for line in text.splitlines()]
            text = "\n".join([*own, "# ... which comes to:", merged])
        sys.stdout.write(text)
        return
    table = Table(show_header=True)
    table.add_column("name")
    table.add_column("what")
    for key, path in shipped_configs().items():
        table.add_row(key, _first_comment(path))
    out.print(table)


def _first_comment(path: Path) -> str:
    """The first sentence of a YAML file's opening comment (its description), without the
    '#'s: a sentence that goes on past a line ends on the next ones, never mid-way."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            if words:
                break
            continue
        words += line.lstrip("#").split()
        text = " ".join(words)
        end = re.search(r"[.](\s|$)", text)
        if end and not re.search(r"\b(e\.g|i\.e|cf|vs|etc)\.$", text[: end.end()].strip()):
            return text[: end.start() + 1].strip()
    return " ".join(words)


def check_applies(given: dict[str, bool], kind: str, command: str) -> None:
    """Refuse options that an experiment of ``kind`` does not read (each declares its own)."""
    from flowvae.experiments import EXPERIMENTS

    accepted = getattr(EXPERIMENTS.get(kind), f"{command}_options")
    wrong = [option for option, is_given in given.items() if is_given and option not in accepted]
    if wrong:
        raise ConfigError(
            f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to a {kind} "
            f"checkpoint — `flowvae {command}` on it takes {', '.join(sorted(accepted))}"
        )


def check_split(split: str) -> None:
    if split not in ("test", "valid"):
        raise ConfigError(f"--split {split!r} is not allowed (choices: test, valid)")


def main() -> None:
    app()


def _reflow(doc: str | None) -> str | None:
    """A docstring with each paragraph on one line: rich help keeps single newlines, which
    leaves ragged lines in a terminal narrower than the source."""
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)


class _PlainHelp:
    """Help that reads as a user types it: no `<bool>` after a flag (it takes no value), and an
    argument as CHECKPOINT in the usage line, not {checkpoint}."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain_metavar(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_metavar(option)
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.+)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


class _Command(_PlainHelp, TyperCommand):
    pass


class _Group(_PlainHelp, TyperGroup):
    pass


def _plain_metavar(param) -> None:
    if getattr(param, "is_flag", False):
        param.metavar = ""
    elif param.param_type_name == "argument" and param.metavar is None:
        param.metavar = param.name.upper()


app.info.cls = _Group
for _info in app.registered_commands:
    _info.help = _info.help or _reflow(_info.callback.__doc__)
    if _info.cls in (None, TyperCommand):
        _info.cls = _Command
