"""Collect evaluated runs (their eval.json) into Markdown, one section per kind of experiment."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from flowvae.experiments import EXPERIMENTS, ReportOptions


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
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    return {**row, "run": str(run_dir), "info": info, "config": cfg}


def report(paths: list[Path], out: Path | None, plot: Path | None, figure: Path | None) -> str:
    from flowvae.runs import load_run

    rows = [load_row(p) for p in find_runs(paths)]
    options = ReportOptions(lambda path: load_run(path, device="cpu"), plot, figure)
    parts: list[str] = []
    for kind in sorted({r["kind"] for r in rows}):
        parts += EXPERIMENTS.get(kind).report([r for r in rows if r["kind"] == kind], options)
    text = "\n".join(parts)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return text
