"""Main-text extraction on real pages (bench/real_pages.py: the Python and Node.js documentation as Debian ships
them): main-text sentence recall, boilerplate leaked and time per page, for each extractor alone, after llmforge's
line rules (data.line_filters) and after its document rules (data.web_filters); with --datatrove-python, datatrove's
default web pipeline (FineWeb's) on the same pages, run by bench/datatrove_side.py in that environment.

    python bench/html_extraction.py [--pages-per-family 0] [--datatrove-python /tmp/dt/bin/python]
        → bench/results/html_extraction.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from real_pages import FAMILIES, Page, pages, score
from results_file import write_result

from llmforge.config.data import LineFilters, WebFilters
from llmforge.data.clean import clean_text
from llmforge.data.filters import clean_lines, web_quality
from llmforge.data.sources.web import html_to_text


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def row(name: str, sel: list[Page], texts: list[str], ms: float, finals: list) -> list[str]:
    """Table cells: extraction alone, after line rules (llmforge rows), kept pages and their scores."""
    raw = [score(t, p) for t, p in zip(texts, sel)]
    kept = [(f, p) for f, p in zip(finals, sel) if f is not None]
    fin = [score(f, p) for f, p in kept]
    return [
        name,
        f"{ms:.1f}",
        str(sum(not t.strip() for t in texts)),
        f"{_mean([r for r, _ in raw]):.1%}",
        f"{_mean([leak for _, leak in raw]):.1%}",
        f"{len(kept)}/{len(sel)}",
        f"{_mean([r for r, _ in fin]):.1%}",
        f"{_mean([leak for _, leak in fin]):.1%}",
        f"{sum(r for r, _ in fin) / len(sel):.1%}",
    ]


def llmforge_pipeline(sel: list[Page], extractor: str, line_rules: bool) -> tuple[list[str], float, list]:
    html_to_text(sel[0].html, extractor)  # warm-up
    started = time.perf_counter()
    texts = [html_to_text(p.html, extractor) for p in sel]
    ms = (time.perf_counter() - started) * 1000 / len(sel)
    finals = []
    for t in texts:
        cleaned = clean_text(t, "web")
        if line_rules:
            cleaned = clean_lines(cleaned, LineFilters())
        finals.append(cleaned if cleaned and web_quality(cleaned, WebFilters()) is None else None)
    return texts, ms, finals


def datatrove_pipeline(sel: list[Page], python: str) -> tuple[list[str], float, list, dict]:
    out = subprocess.run(
        [python, os.path.join(os.path.dirname(__file__), "datatrove_side.py")],
        input=json.dumps([p.path for p in sel]),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r["path"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    reasons: dict = {}
    for r in rows.values():
        if r["dropped"]:
            reasons[r["dropped"]] = reasons.get(r["dropped"], 0) + 1
    return (
        [rows[p.path]["extracted"] for p in sel],
        _mean([rows[p.path]["ms"] for p in sel]),
        [rows[p.path]["final"] for p in sel],
        reasons,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages-per-family", type=int, default=0, help="0 = every page")
    ap.add_argument("--datatrove-python", help="python of an environment with datatrove (see datatrove_side.py)")
    ap.add_argument("--quick", action="store_true", help="5 pages per family (a smoke run, figures meaningless)")
    ap.add_argument("--out")
    args = ap.parse_args()
    limit = 5 if args.quick else args.pages_per_family
    every = pages(limit)
    header = [
        "pipeline",
        "ms / page (extraction)",
        "empty",
        "recall (extracted)",
        "leak (extracted)",
        "pages kept",
        "recall (kept pages)",
        "leak (kept pages)",
        "recall (all pages, dropped = 0)",
    ]
    lines = [
        "# HTML main-text extraction on real pages",
        "",
        "Command: `python bench/html_extraction.py"
        + (f" --pages-per-family {limit}" if limit else "")
        + (" --datatrove-python PY" if args.datatrove_python else "")
        + f"`; {platform.machine()}, one core, "
        f"Python {platform.python_version()}. Pages: bench/real_pages.py — "
        + ", ".join(f"{fam} ({sum(p.path.startswith(FAMILIES[fam][0]) for p in every)} pages)" for fam in FAMILIES)
        + ". Recall: share of the main block's sentences (6+ words) found in the text; leak: share of the page's "
        "navigation / sidebar / header / footer snippets (2+ words, not in the main block) found in it; both "
        "averaged over pages. 'kept': pages that pass the pipeline's document rules.",
        "",
        "Rows: `X` = llmforge's `html_to_text(X)` then the document rules (data.web_filters defaults) without line "
        "rules; `X + line rules` = with data.line_filters (C4) before them, as `prepare_data` runs; `datatrove` = "
        "Trafilatura(favour_precision) → Gopher repetition → Gopher quality → C4 (no terminal-punctuation rule) → "
        "FineWeb filters, datatrove 0.10.1 defaults.",
    ]
    drops_all = {}
    for fam in FAMILIES:
        sel = [p for p in every if p.path.startswith(FAMILIES[fam][0])]
        if not sel:
            continue
        lines += ["", f"## {fam} ({len(sel)} pages)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for extractor in ("trafilatura", "resiliparse"):
            for rules in (False, True):
                texts, ms, finals = llmforge_pipeline(sel, extractor, rules)
                name = extractor + (" + line rules" if rules else "")
                lines.append("| " + " | ".join(row(name, sel, texts, ms, finals)) + " |")
        if args.datatrove_python:
            texts, ms, finals, drops = datatrove_pipeline(sel, args.datatrove_python)
            drops_all[fam] = drops
            lines.append("| " + " | ".join(row("datatrove (FineWeb pipeline)", sel, texts, ms, finals)) + " |")
    if drops_all:
        lines += [
            "",
            "datatrove's drop reasons: "
            + "; ".join(
                f"{fam}: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
                for fam, d in drops_all.items()
            ),
        ]
    text = "\n".join(lines) + "\n"
    write_result(text, args.out, "html_extraction.md")
    print(text)


if __name__ == "__main__":
    main()
