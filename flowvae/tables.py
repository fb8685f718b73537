"""The Markdown tables of `flowvae report` for VAE runs: one row per run, and the paired
image-by-image differences between runs scored on the same images."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from flowvae.paper import PaperTable, flow_rank

__all__ = ["BITS_COLUMNS", "PAIRED_INTRO", "nll_table", "paired_table"]


#: Report columns of continuous data (their eval.json has them), after -log p(x).
BITS_COLUMNS = [("bits_per_dim", "bits/dim"), ("bits_per_dim_8bit", "bits/dim (8-bit)")]


def nll_table(rows: list[dict], paper: PaperTable | None = None) -> str:
    """One row per run: the bound, the estimate, whether its importance weights can be trusted
    (share of images with Pareto k̂ > 0.7, median ESS of S), the value of the paper's table
    ``paper`` (if any), the cost. Continuous data adds bits/dim, over
    x ∈ (ε, 1 − ε) and over the dequantised 256-level pixels (flowvae.likelihoods)."""
    bits = [(key, head) for key, head in BITS_COLUMNS if all(key in r for r in rows)]
    # sweep --iw-samples 200 --iw-samples 5000: one more estimate per extra S
    extra = sorted({int(s) for r in rows for s in r.get("by_samples", {})})
    head = ["run", "flow", "K", "split", "−ELBO", "−log p(x) ± s.e.", *(h for _, h in bits)]
    head += ["IS samples"]
    head += [f"−log p(x), S = {s:,}" for s in extra]
    head += ["k̂ > 0.7", "median ESS", "paper −log p(x)", "steps", "train min", "hardware"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---", "---:", "---", *["---:"] * (len(head) - 5), "---"]) + "|",
    ]
    for r in sorted(rows, key=lambda r: (*flow_rank(r["flow"]), r["k"])):
        seconds = r["info"].get("train_seconds")
        khat = f"{r['khat_over_0_7']:.1%}" if "khat_over_0_7" in r else "—"
        ess = f"{r['ess_median']:.1f}" if "ess_median" in r else "—"
        cells = [
            Path(r["run"]).name if "run" in r else "—",
            "none" if r["k"] == 0 else r["flow"],
            str(r["k"]),
            r.get("split", "test"),
            f"{r['neg_elbo']:.2f}",
            f"{r['nll']:.2f} ± {r['nll_stderr']:.2f}",
            *(f"{r[key]:.3f}" for key, _ in bits),
            str(r["iw_samples"]),
            *(_estimate(r.get("by_samples", {}).get(str(s))) for s in extra),
            khat,
            ess,
            # the paper's numbers are test numbers: a validation run is not set beside them
            paper.cell(r["flow"], r["k"]) if paper and r.get("split", "test") == "test" else "—",
            str(r["info"].get("steps", r.get("step", "?"))),
            f"{seconds / 60:.1f}" if seconds is not None else "?",
            str(r["info"].get("hardware", "?")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_INTRO = (
    "Differences in −log p(x) between runs scored on the same images, image by image "
    "(positive: the second run is better), ± the standard error of the per-image differences:"
)


def paired_table(rows: list[dict]) -> str | None:
    """Each flow against the flow-free model and its own next-shorter K, and the families
    against each other at equal K, from the per-image estimates of runs on the same images.

    Two runs scored on the same images share most of their spread (some images are hard for
    every model), so the standard error of the per-image differences is a fraction of the
    runs' own standard errors: it says whether one K beats another, which theirs cannot."""
    lines = []
    for split, label, a, b in _pairs(rows):
        x, y = torch.tensor(a["nll_per_image"]), torch.tensor(b["nll_per_image"])
        if x.shape != y.shape or a["iw_samples"] != b["iw_samples"]:
            continue
        diff = (x - y).double()
        mean, stderr = float(diff.mean()), float(diff.std()) / math.sqrt(diff.numel())
        lines.append(
            f"| {label} | {split} | {a['iw_samples']} | {mean:+.2f} ± {stderr:.2f} "
            f"| {mean / stderr:+.1f} |"
        )
    if not lines:
        return None
    head = "| comparison | split | IS samples | difference (nats) | difference / s.e. |"
    return "\n".join([head, "|---|---|---:|---:|---:|", *lines])


def _pairs(rows: list[dict]) -> list[tuple[str, str, dict, dict]]:
    """(split, label, run, the run it is compared with) for paired_table."""
    found: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        flow = "none" if r["k"] == 0 else r["flow"]
        if "nll_per_image" in r:
            found.setdefault((r.get("split", "test"), flow, r["k"]), []).append(r)
    # A (flow, K) evaluated more than once (seeds, a longer preview) has no single partner.
    runs = {key: group[0] for key, group in found.items() if len(group) == 1}
    pairs = []
    for split in sorted({s for s, *_ in runs}):
        at = {(f, k): r for (s, f, k), r in runs.items() if s == split}
        flows = sorted({f for f, _ in at if f != "none"}, key=flow_rank)
        for flow in flows:
            chain = [at[("none", 0)]] if ("none", 0) in at else []
            chain += [at[key] for key in sorted(key for key in at if key[0] == flow)]
            for a, b in itertools.pairwise(chain):
                pairs.append((split, f"{flow}: K = {a['k']} → {b['k']}", a, b))
        for first, second in itertools.combinations(flows, 2):
            for k in sorted(k for f, k in at if f == first and (second, k) in at):
                pairs.append(
                    (split, f"K = {k}: {second} → {first}", at[(second, k)], at[(first, k)])
                )
    return pairs


def _estimate(result: dict | None) -> str:
    return f"{result['nll']:.2f} ± {result['nll_stderr']:.2f}" if result else "—"
