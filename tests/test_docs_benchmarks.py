"""Benchmark tables in the docs are the tables the benchmark scripts wrote.

A table in docs/*.md preceded by a marker line

    <!-- table: benchmarks/results-peers.md -->

must be, line for line, a table of that file (what `make bench-peers` or `make bench-floor`
wrote, with the command, date, machine and load above it there), so a number in the docs is
one the scripts measured, not one typed in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- table: (?P<source>\S+) -->")


def tables(lines: list[str]) -> list[list[str]]:
    """Every run of consecutive table lines."""
    found, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            found.append(current)
            current = []
    return found


def quoted_tables(doc: Path) -> list[tuple[str, list[str]]]:
    """(source, table) for every marker in ``doc``: the first table after the marker."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    quoted = []
    for i, line in enumerate(lines):
        match = MARKER.search(line)
        if match:
            following = tables(lines[i + 1 :])
            assert following, f"{doc.name}:{i + 1}: a table marker with no table after it"
            quoted.append((match["source"], following[0]))
    return quoted


DOCS = sorted((ROOT / "docs").glob("*.md"))
QUOTES = [(doc, source, table) for doc in DOCS for source, table in quoted_tables(doc)]


def test_the_benchmark_docs_quote_their_tables():
    sources = {source for _, source, _ in QUOTES}
    assert {"benchmarks/results-peers.md", "benchmarks/results-floor.md"} <= sources


@pytest.mark.parametrize(("doc", "source", "table"), QUOTES, ids=lambda x: getattr(x, "name", ""))
def test_a_quoted_table_is_the_scripts_table(doc, source, table):
    written = tables((ROOT / source).read_text(encoding="utf-8").splitlines())
    assert table in written, f"{doc.name}: a table differs from every table of {source}"


def test_a_changed_number_is_caught(tmp_path):
    (tmp_path / "results.md").write_text("# r\n\n| a | b |\n|---|---:|\n| x | 1.25 |\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        f"<!-- table: {tmp_path / 'results.md'} -->\n\n| a | b |\n|---|---:|\n| x | 1.26 |\n"
    )
    ((source, table),) = quoted_tables(doc)
    assert table not in tables(Path(source).read_text().splitlines())
    assert table[:2] == ["| a | b |", "|---|---:|"]
