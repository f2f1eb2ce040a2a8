"""Main-text extraction on real pages of several kinds and languages (bench/real_pages.py: documentation pages
from Debian packages; with --sdists, the real web pages and news articles two extraction libraries ship with their
expected output): main-text recall, boilerplate leaked and time per page, for each extractor alone and after each
setting of llmforge's line rules (data.line_filters), then the pages its document rules (data.web_filters, with the
page's language) keep; by page kind and by language. With --datatrove-python, datatrove's default web pipeline
(FineWeb's) on the same pages, run by bench/datatrove_side.py in that environment.

    python bench/html_extraction.py [--sdists DIR] [--pages-per-family 0] [--datatrove-python /tmp/dt/bin/python]
        → bench/results/html_extraction.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(__file__))

from real_pages import Page, pages, score, sdist_pages
from results_file import write_result

from llmforge.config.data import C4_TERMINAL_PUNCTUATION, LineFilters, WebFilters
from llmforge.data.clean import clean_text
from llmforge.data.filters import clean_lines, web_quality
from llmforge.data.language import identify
from llmforge.data.sources.web import html_to_text


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


# line-rule settings compared: C4's rules as shipped; without the terminal-punctuation rule (FineWeb keeps such
# lines and judges the document by its share of punctuated lines instead, data.web_filters.min_punct_line_fraction)
LINE_SETTINGS = {
    "no line rules": None,
    "C4 line rules": LineFilters(terminal_punctuation=C4_TERMINAL_PUNCTUATION),
    "line rules without terminal punctuation": LineFilters(terminal_punctuation=""),  # the default
}


@dataclass
class Outcome:
    extracted: tuple[float, float]  # (recall, leak) of the extractor's text
    after_lines: tuple[float, float]  # after the line rules
    kept: bool  # passes the document rules
    ms: float  # extraction time


def run_llmforge(sel: list[Page], extractor: str) -> dict[str, list[Outcome]]:
    """Outcomes per line setting for every page."""
    html_to_text(sel[0].html, extractor)  # warm-up
    texts, took = [], []
    for p in sel:
        started = time.perf_counter()
        texts.append(html_to_text(p.html, extractor))
        took.append((time.perf_counter() - started) * 1000)
    out: dict[str, list[Outcome]] = {name: [] for name in LINE_SETTINGS}
    for text, page, ms in zip(texts, sel, took):
        cleaned = clean_text(text, "web")
        lang, _ = identify(cleaned) if cleaned else ("unknown", 0.0)
        for name, lines in LINE_SETTINGS.items():
            final = clean_lines(cleaned, lines, lang=lang) if lines else cleaned
            kept = bool(final) and web_quality(final, WebFilters(), lang) is None
            out[name].append(Outcome(score(text, page), score(final, page), kept, ms))
    return out


def run_datatrove(sel: list[Page], python: str) -> tuple[list[Outcome], dict]:
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
    outcomes = [
        Outcome(
            score(rows[p.path]["extracted"], p),
            score(rows[p.path]["extracted"], p),
            rows[p.path]["final"] is not None,
            rows[p.path]["ms"],
        )
        for p in sel
    ]
    return outcomes, reasons


def cells(outcomes: list[Outcome]) -> list[str]:
    n = len(outcomes)
    return [
        f"{_mean([o.extracted[0] for o in outcomes]):.1%}",
        f"{_mean([o.extracted[1] for o in outcomes]):.1%}",
        f"{_mean([o.after_lines[0] for o in outcomes]):.1%}",
        f"{_mean([o.after_lines[1] for o in outcomes]):.1%}",
        f"{sum(o.kept for o in outcomes)}/{n}",
        f"{sum(o.after_lines[0] for o in outcomes if o.kept) / n:.1%}",
    ]


HEADER = [
    "recall (extracted)",
    "leak (extracted)",
    "recall (after line rules)",
    "leak (after line rules)",
    "pages kept",
    "main text kept (all pages, dropped = 0)",
]


def table(groups: dict[str, list[int]], results: dict[str, list[Outcome]]) -> list[str]:
    """One row per group x pipeline; `groups` maps a group's name to its pages' indices."""
    head = ["pages", "pipeline", "ms / page"] + HEADER
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, idx in groups.items():
        for name, outcomes in results.items():
            sub = [outcomes[i] for i in idx]
            ms = _mean([o.ms for o in sub])
            lines.append(f"| {group} ({len(idx)}) | {name} | {ms:.1f} | " + " | ".join(cells(sub)) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages-per-family", type=int, default=0, help="0 = every page")
    ap.add_argument("--sdists", help="directory for the extraction libraries' source distributions (pip download)")
    ap.add_argument("--datatrove-python", help="python of an environment with datatrove (see datatrove_side.py)")
    ap.add_argument("--quick", action="store_true", help="5 pages per family (a smoke run, figures meaningless)")
    ap.add_argument("--out")
    args = ap.parse_args()
    limit = 5 if args.quick else args.pages_per_family
    every = pages(limit)
    if args.sdists:
        extra = sdist_pages(args.sdists)
        for fam in sorted({p.family for p in extra}):
            every += [p for p in extra if p.family == fam][: limit or None]
    for page in every:
        page.lang = identify(" ".join(page.sentences))[0]
    results: dict[str, list[Outcome]] = {}
    for extractor in ("resiliparse", "trafilatura"):
        for setting, per_page in run_llmforge(every, extractor).items():
            results[f"{extractor}, {setting}"] = per_page
    drops: dict = {}
    if args.datatrove_python:
        results["datatrove (FineWeb pipeline)"], drops = run_datatrove(every, args.datatrove_python)
    families = {}
    for fam in dict.fromkeys(p.family for p in every):
        families[fam] = [i for i, p in enumerate(every) if p.family == fam]
    languages: dict[str, list[int]] = {}
    for i, p in sorted(enumerate(every), key=lambda ip: ip[1].lang):
        languages.setdefault(p.lang, []).append(i)
    main_rows = {k: v for k, v in results.items() if "no line rules" not in k}
    lines = [
        "# HTML main-text extraction on real pages of several kinds and languages",
        "",
        "Command: `python bench/html_extraction.py"
        + (" --sdists DIR" if args.sdists else "")
        + (f" --pages-per-family {limit}" if limit else "")
        + (" --datatrove-python PY" if args.datatrove_python else "")
        + f"`; {platform.machine()}, one core, Python {platform.python_version()}, resiliparse "
        f"{version('resiliparse')}, trafilatura {version('trafilatura')}. Pages (bench/real_pages.py): "
        + ", ".join(f"{fam} {len(idx)}" for fam, idx in families.items())
        + ". Recall: share of the page's main-text sentences (or the snippets its library's tests require) found "
        "in the text; leak: share of its boilerplate snippets (navigation, sidebars, headers, footers, link lists; "
        "or the snippets the tests forbid) found in it; both averaged over pages. Language: lid.176 on the page's "
        "main text. 'kept': pages that pass the document rules (data.web_filters defaults, with the page's "
        "language); the last column counts a dropped page as 0.",
        "",
        "Line settings: none; C4's line rules (data.line_filters with terminal_punctuation: "
        "C4_TERMINAL_PUNCTUATION, the default before this benchmark); the same without the terminal-punctuation "
        "rule (terminal_punctuation: '', the default now, FineWeb's choice: its document rule "
        "min_punct_line_fraction then judges the share of punctuated lines). datatrove = "
        "Trafilatura(favour_precision) → Gopher repetition → Gopher quality → C4 (no terminal-punctuation "
        "rule) → FineWeb filters, datatrove 0.10.1 defaults (its 'after line rules' columns are its extracted "
        "text).",
        "",
        "## By page kind",
        "",
        *table(families, results),
        "",
        "## By language (every kind; C4's line rules and the default, without terminal punctuation)",
        "",
        *table(languages, main_rows),
    ]
    if drops:
        top = sorted(drops.items(), key=lambda kv: -kv[1])
        lines += ["", "datatrove's drop reasons: " + ", ".join(f"{k} {v}" for k, v in top)]
    text = "\n".join(lines) + "\n"
    write_result(text, args.out, "html_extraction.md")
    print(text)


if __name__ == "__main__":
    main()
