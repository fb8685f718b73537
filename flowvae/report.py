"""Collect evaluated runs into Markdown tables and pictures, beside the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flowvae.paper import paper_nll

FLOW_ORDER = ["planar", "radial", "nice"]


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (those holding eval.json) under the given paths, sorted."""
    found: set[Path] = set()
    for p in paths:
        if (p / "eval.json").exists():
            found.add(p)
        elif p.is_dir():
            found.update(e.parent for e in p.rglob("eval.json"))
    return sorted(found)


def load_row(run_dir: Path) -> dict:
    row = json.loads((run_dir / "eval.json").read_text())
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    cfg = (
        yaml.safe_load((run_dir / "config.yaml").read_text())
        if (run_dir / "config.yaml").exists()
        else {}
    )
    return {**row, "run": str(run_dir), "info": info, "config": cfg}


def _order(row: dict) -> tuple:
    flow = row["flow"]
    rank = FLOW_ORDER.index(flow) if flow in FLOW_ORDER else len(FLOW_ORDER)
    return (row.get("target", ""), rank, flow, row["k"])


def _minutes(row: dict) -> str:
    seconds = row["info"].get("train_seconds")
    return f"{seconds / 60:.1f}" if seconds is not None else "?"


def vae_table(rows: list[dict]) -> str:
    lines = [
        "| flow | K | −ELBO | −log p(x) ± s.e. | IS samples | paper −log p(x) | steps | train min | hardware |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=_order):
        paper = paper_nll(r["flow"], r["k"])
        paper_cell = f"≤ {paper:.1f}" if paper else "—"
        flow = "none" if r["k"] == 0 else r["flow"]
        lines.append(
            f"| {flow} | {r['k']} | {r['neg_elbo']:.2f} | {r['nll']:.2f} ± {r['nll_stderr']:.2f} | "
            f"{r['iw_samples']} | {paper_cell} | {r['info'].get('steps', r.get('step', '?'))} | "
            f"{_minutes(r)} | {r['info'].get('hardware', '?')} |"
        )
    return "\n".join(lines)


def density_table(rows: list[dict]) -> str:
    ks = sorted({r["k"] for r in rows})
    flows = sorted({r["flow"] for r in rows}, key=lambda f: (FLOW_ORDER + [f]).index(f))
    targets = sorted({r["target"] for r in rows})
    by_key = {(r["target"], r["flow"], r["k"]): r for r in rows}
    header = "| target | " + " | ".join(f"{f} K={k}" for f in flows for k in ks) + " |"
    lines = [header, "|---|" + "---:|" * (len(flows) * len(ks))]
    for t in targets:
        cells = []
        for f in flows:
            for k in ks:
                r = by_key.get((t, f, k))
                cells.append(f"{r['kl']:.3f} ± {r['kl_stderr']:.3f}" if r else "—")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nll_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    base = [r for r in rows if r["k"] == 0]
    for flow in sorted({r["flow"] for r in rows if r["k"] > 0}):
        pts = sorted(
            [r for r in rows if r["flow"] == flow and r["k"] > 0] + base, key=lambda r: r["k"]
        )
        ax.errorbar(
            [r["k"] for r in pts],
            [r["nll"] for r in pts],
            yerr=[r["nll_stderr"] for r in pts],
            marker="o",
            label=f"{flow} (measured)",
            capsize=2,
        )
        paper = [(k, paper_nll(flow, k)) for k in (0, 10, 20, 40, 80) if paper_nll(flow, k)]
        if paper:
            ax.plot(*zip(*paper), linestyle="--", marker="x", alpha=0.6, label=f"{flow} (paper)")
    ax.set_xlabel("flow length K")
    ax.set_ylabel("test −log p(x) (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def figure3_grid(rows: list[dict], path: Path, n: int = 100) -> None:
    """Targets (rows) × the target itself and each (flow, K) (columns), as in the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowvae.plots import BOX, model_density_grid, target_density_grid
    from flowvae.runs import load_run
    from flowvae.targets import TARGETS

    targets = sorted({r["target"] for r in rows})
    columns = sorted(
        {(r["flow"], r["k"]) for r in rows},
        key=lambda fk: ((FLOW_ORDER + [fk[0]]).index(fk[0]), fk[1]),
    )
    by_key = {(r["target"], r["flow"], r["k"]): r for r in rows}
    fig, axes = plt.subplots(
        len(targets),
        len(columns) + 1,
        figsize=(1.3 * (len(columns) + 1), 1.35 * len(targets)),
        dpi=110,
        squeeze=False,
    )
    for i, t in enumerate(targets):
        panels = [(f"{t}", target_density_grid(TARGETS.get(t), n))]
        for flow, k in columns:
            r = by_key.get((t, flow, k))
            if r is None:
                panels.append((f"{flow} K={k}", None))
                continue
            run = load_run(Path(r["run"]) / "checkpoints" / "best.pt", device="cpu")
            panels.append(
                (f"{flow} K={k}\nKL {r['kl']:.2f}", model_density_grid(run.experiment.model, n))
            )
        for j, (title, grid) in enumerate(panels):
            ax = axes[i][j]
            if grid is not None:
                ax.imshow(grid, origin="lower", extent=(-BOX, BOX, -BOX, BOX), cmap="viridis")
            ax.set_title(title, fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(paths: list[Path], out: Path | None, plot: Path | None, figure: Path | None) -> str:
    rows = [load_row(p) for p in find_runs(paths)]
    vae = [r for r in rows if r["kind"] == "vae"]
    dens = [r for r in rows if r["kind"] == "density"]
    parts = []
    if vae:
        parts += ["## Flow VAE on binarised MNIST", "", vae_table(vae), ""]
        if plot is not None:
            nll_plot(vae, plot)
            parts += [f"![-log p(x) against K]({plot.name})", ""]
    if dens:
        parts += [
            "## Density matching: KL(q‖p) in nats (± standard error)",
            "",
            density_table(dens),
            "",
        ]
        if figure is not None:
            figure3_grid(dens, figure)
            parts += [f"![Figure 3 grid]({figure.name})", ""]
    text = "\n".join(parts)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return text
