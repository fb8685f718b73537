#!/usr/bin/env python
"""Refresh the benchmark tables quoted in docs/*.md from the files the benchmarks wrote.

A table preceded by ``<!-- table: benchmarks/results-X.md -->`` is replaced by the table of that
file with the same header line (tests/test_docs_benchmarks.py checks that they agree):

    make bench-floor bench-peers && python benchmarks/quote_tables.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

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


def refresh(doc: Path) -> bool:
    """Rewrite ``doc`` with its quoted tables taken from their sources; True if it changed."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out, i, source = [], 0, None
    while i < len(lines):
        line = lines[i]
        match = MARKER.search(line)
        if match:
            source = match["source"]
        if source and line.startswith("|"):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            fresh = [t for t in tables((ROOT / source).read_text().splitlines()) if t[0] == line]
            if not fresh:
                sys.exit(f"{doc}: no table in {source} has the header {line!r}")
            out += fresh[0]
            i, source = end, None
            continue
        out.append(line)
        i += 1
    text = "\n".join(out) + "\n"
    changed = text != doc.read_text(encoding="utf-8")
    doc.write_text(text, encoding="utf-8")
    return changed


if __name__ == "__main__":
    for path in sorted((ROOT / "docs").glob("*.md")):
        if refresh(path):
            print(f"updated {path.relative_to(ROOT)}")
