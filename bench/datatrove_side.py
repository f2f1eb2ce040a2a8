"""The peer's side of bench/html_extraction.py, run by the Python of an environment where datatrove is installed
(it is not an llmforge dependency):

    python -m venv /tmp/dt && /tmp/dt/bin/pip install "datatrove[processing]==0.10.1" faust-cchardet python-magic \
        orjson warcio lxml_html_clean
    python bench/html_extraction.py --datatrove-python /tmp/dt/bin/python

Reads a JSON list of HTML file paths on stdin and writes one JSON line per page: datatrove's default web pipeline
as FineWeb runs it — Trafilatura(favour_precision=True) → GopherRepetitionFilter → GopherQualityFilter →
C4QualityFilter(filter_no_terminal_punct=False) → FineWebQualityFilter, all with their defaults — the extracted
text, the final text (null when a filter drops the page), the filter that dropped it and the extraction time.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from datatrove.data import Document
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    extractor = Trafilatura(favour_precision=True)
    filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
               FineWebQualityFilter()]
    paths = json.load(sys.stdin)
    extractor.extract("<html><body><p>warm-up</p></body></html>")
    for path in paths:
        with open(path, "rb") as f:
            html = f.read().decode("utf-8", errors="replace")
        started = time.perf_counter()
        text = extractor.extract(html) or ""
        ms = (time.perf_counter() - started) * 1000
        doc = Document(text=text, id=path)
        dropped = None if text else "empty"
        for flt in filters if text else []:
            verdict = flt.filter(doc)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            if not keep:
                dropped = f"{type(flt).__name__}:{reason}"
                break
        print(json.dumps({"path": path, "extracted": text, "final": None if dropped else doc.text,
                          "dropped": dropped, "ms": ms}))


if __name__ == "__main__":
    main()
