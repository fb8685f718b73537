"""The numbers the docs quote are the numbers the kept runs hold (docs/runs/*/*/eval.json).

- Tables `flowvae report` writes (docs/table2.md, docs/table2-long.md) are written again from
  their kept runs and must be what the files hold, line for line.
- Prose is checked block by block: a block (a paragraph, list or table) of README.md or
  docs/results.md that quotes kept runs is preceded by a marker line

      <!-- numbers: docs/runs/table2 docs/runs/table2-seed1; also: 88.09 87.66 -->

  naming the kept folders it quotes. Every number of the block with two or three decimals
  (−log p(x), −ELBO, standard errors, paired differences, gaps) and every percentage (k̂ shares)
  must then be a value those runs give at the printed precision: a −log p(x) (S = 200 or
  5,000) or −ELBO, a share of images with k̂ > 0.7, a paired difference between two of the
  runs (image by image, ± its standard error) or of their means, a posterior gap −ELBO − (−log p(x)), the fall
  from S = 200 to S = 5,000, or the distance to the paper's Table 2 value. The numbers after
  ``also:`` are the block's others (validation −ELBO from a run's metrics, runs not kept), which
  the block's text says where they come from; a "a ± b" whose a is listed there passes.
- A block that quotes a kept run's "−log p(x) ± s.e." must carry a marker.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from flowvae.paper import TABLE2
from flowvae.report import report

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "runs"
PROSE = ("README.md", "docs/results.md")
GENERATED = {"docs/table2.md": "docs/runs/table2", "docs/table2-long.md": "docs/runs/table2-long"}

MARKER = re.compile(r"<!-- numbers: (?P<folders>[^;>]*?)(?:; also: (?P<also>[^>]*?))? -->")
PLUS_MINUS = re.compile(r"([+−-]?\d+\.\d+) ± (\d+\.\d+)")
DECIMAL = re.compile(r"(?<![\d.,])[+−-]?(\d+\.\d{2,3})(?![\d])")
PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d)?) ?%")


@pytest.mark.parametrize("doc", sorted(GENERATED))
def test_generated_tables_are_what_report_writes_from_the_kept_runs(doc):
    written = report([ROOT / GENERATED[doc]], out=None, plot=None, figure=None)
    tables = [line for line in written.splitlines() if line.startswith("|")]
    kept = [line for line in (ROOT / doc).read_text().splitlines() if line.startswith("|")]
    assert tables and kept == tables


def _runs(folder: str) -> list[dict]:
    paths = sorted((ROOT / folder).glob("*/eval.json"))
    assert paths, f"no kept runs in {folder}"
    return [json.loads(p.read_text()) for p in paths]


def _estimates(run: dict) -> list[dict]:
    """The run's estimates: its S = 200 one, and any at other S."""
    return [run, *run.get("by_samples", {}).values()]


def _paired(a: dict, b: dict) -> tuple[float, float] | None:
    if "nll_per_image" not in a or "nll_per_image" not in b:
        return None
    x, y = np.asarray(a["nll_per_image"]), np.asarray(b["nll_per_image"])
    if x.shape != y.shape or a["iw_samples"] != b["iw_samples"]:
        return None
    diff = x - y
    return abs(float(diff.mean())), float(diff.std(ddof=1)) / math.sqrt(diff.size)


def _values(runs: list[dict]) -> tuple[set[str], set[str], set[str]]:
    """(pairs 'a ± b', bare numbers, percentages) these runs give, as the docs print them."""
    pairs, bare, shares = set(), set(), set()
    for run in runs:
        for est in _estimates(run):
            for places in (2, 3):
                nll, se, elbo = est["nll"], est["nll_stderr"], est["neg_elbo"]
                pairs.add(f"{nll:.{places}f} ± {se:.{min(places, 2)}f}")
                bare.update({f"{nll:.{places}f}", f"{elbo:.{places}f}"})
            bare.add(f"{est['neg_elbo'] - est['nll']:.2f}")
            if "khat_over_0_7" in est:
                shares.update({f"{100 * est['khat_over_0_7']:.0f}"})
                shares.update({f"{100 * est['khat_over_0_7']:.1f}"})
            paper = TABLE2.nll(run["flow"], run["k"])
            if paper is not None:
                bare.add(f"{paper - est['nll']:.2f}")
        for s in run.get("by_samples", {}).values():
            bare.add(f"{run['nll'] - s['nll']:.2f}")
    estimates = [est for run in runs for est in _estimates(run)]
    for a, b in itertools.combinations(estimates, 2):
        bare.add(f"{abs(a['nll'] - b['nll']):.2f}")  # a difference of means
        found = _paired(a, b)
        if found is not None:
            pairs.add(f"{found[0]:.2f} ± {found[1]:.2f}")
            bare.update({f"{found[0]:.2f}", f"{found[1]:.2f}"})
    return pairs, bare, shares


@cache
def _folder_values(folders: tuple[str, ...]) -> tuple[set[str], set[str], set[str]]:
    return _values([run for folder in folders for run in _runs(folder)])


def _blocks(text: str) -> list[tuple[dict | None, str, int]]:
    """(marker, block text, first line) for every block of lines between blank lines; a marker
    line belongs to the block it starts."""
    blocks, lines, start = [], [], 0
    for number, line in enumerate([*text.splitlines(), ""], 1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
            continue
        if lines:
            marker = MARKER.fullmatch(lines[0].strip())
            body = "\n".join(lines[1:] if marker else lines)
            blocks.append((marker.groupdict() if marker else None, body, start))
        lines = []
    return blocks


def _problems(marker: dict, body: str) -> list[str]:
    folders = tuple(marker["folders"].split())
    pairs, bare, shares = _folder_values(folders)
    also = set((marker["also"] or "").split())
    problems = []
    text = body.replace("\u2009", " ")
    for a, b in PLUS_MINUS.findall(text):
        quoted = f"{a.lstrip('+−-')} ± {b}"
        if quoted not in pairs and a.lstrip("+−-") not in also:
            problems.append(quoted)
    for number in DECIMAL.findall(PLUS_MINUS.sub(" ", text)):
        if number not in bare and number not in also:
            problems.append(number)
    for share in PERCENT.findall(text):
        if share not in shares and f"{share}%" not in also:
            problems.append(f"{share} %")
    return problems


@pytest.mark.parametrize("doc", PROSE)
def test_quoted_numbers_are_the_kept_runs(doc):
    checked = 0
    wrong = []
    for marker, body, line in _blocks((ROOT / doc).read_text(encoding="utf-8")):
        if marker is None:
            continue
        checked += 1
        wrong += [f"{doc}:{line}: {p}" for p in _problems(marker, body)]
    assert checked > 0, f"{doc} has no <!-- numbers: ... --> markers"
    assert not wrong, "numbers not in the kept runs they cite:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", PROSE)
def test_every_block_quoting_a_kept_run_says_which(doc):
    kept = {
        f"{est['nll']:.2f} ± {est['nll_stderr']:.2f}"
        for folder in sorted(RUNS.iterdir())
        if any(folder.glob("*/eval.json"))  # (docs/runs/mnist-2d keeps posterior views only)
        for run in _runs(str(folder.relative_to(ROOT)))
        for est in _estimates(run)
    }
    unmarked = [
        f"{doc}:{line}"
        for marker, body, line in _blocks((ROOT / doc).read_text(encoding="utf-8"))
        if marker is None and any(q in kept for q in _quoted_pairs(body))
    ]
    assert not unmarked, "blocks quoting kept runs without a numbers marker: " + ", ".join(unmarked)


def _quoted_pairs(body: str) -> list[str]:
    return [f"{a.lstrip('+−-')} ± {b}" for a, b in PLUS_MINUS.findall(body)]


def test_a_misquoted_number_is_caught():
    marker = {"folders": "docs/runs/table2", "also": "88.09"}
    right = "K = 0 85.81 ± 0.22 (k̂ > 0.7 for 90 % of images), validation 88.09; 0.26 ± 0.02"
    assert _problems(marker, right) == []
    wrong = "K = 0 85.81 ± 0.23 (k̂ > 0.7 for 91 % of images), validation 88.10; 0.26 ± 0.09"
    assert _problems(marker, wrong) == ["85.81 ± 0.23", "0.26 ± 0.09", "88.10", "91 %"]
