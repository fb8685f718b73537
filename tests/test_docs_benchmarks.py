"""Benchmark tables in the docs are the tables the benchmark scripts wrote.

A table in docs/*.md preceded by a marker line

    <!-- table: benchmarks/results-peers.md -->

must be, line for line, a table of that file (what `make bench-peers` or `make bench-floor`
wrote, with the command, date, machine and load above it there), so a number in the docs is
one the scripts measured, not one typed in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "quote_tables", ROOT / "benchmarks" / "quote_tables.py"
)
quote_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quote_tables)
tables = quote_tables.tables


def quoted_tables(doc: Path) -> list[tuple[str, list[str]]]:
    """(source, table) for every marker in ``doc``: the first table after the marker."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    quoted = []
    for i, line in enumerate(lines):
        match = quote_tables.MARKER.search(line)
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


def test_quote_tables_copies_the_table_with_the_same_header(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("| k | s |\n|---|---:|\n| 1 | 9 |\n\n| a | b |\n|---|---:|\n| x | 1.25 |\n")
    doc = tmp_path / "doc.md"
    doc.write_text(f"text\n<!-- table: {results} -->\n| a | b |\n|---|---:|\n| x | 7 |\n\nend\n")
    assert quote_tables.refresh(doc) is True
    assert doc.read_text().splitlines()[2:6] == ["| a | b |", "|---|---:|", "| x | 1.25 |", ""]
    assert doc.read_text().endswith("end\n")
    assert quote_tables.refresh(doc) is False
