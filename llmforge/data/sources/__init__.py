"""Raw corpus readers, one per source type, behind one signature:

    read(path, spec, stats) -> Iterator[Document]

A reader streams documents from one input file; records a dirty corpus naturally contains (a corrupt WARC record,
undecodable bytes, an unreadable archive member) are skipped and counted in `stats` as `skipped:<reason>`.
Inputs are grouped into work units (one large file, or a batch of small ones) so preparation can be split across
workers and nodes.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from llmforge.config.data import SourceSpec
from llmforge.data.sources import code, latex, tabular, text, web
from llmforge.data.sources.base import Document, Stats, count
from llmforge.data.sources.code import is_code_file
from llmforge.errors import DataError

__all__ = ["Document", "Stats", "WorkUnit", "count", "expand_paths", "read_unit", "reader_for", "work_units"]

# Extensions a directory walk picks up per source type (a file named directly is always read).
EXTENSIONS = {
    "text": (".txt", ".md", ".text"),
    "html": (".html", ".htm"),
    "warc": (".warc", ".warc.gz"),
    "latex": (".tex", ".tar.gz", ".tgz", ".tar"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
}


def _extension(name: str) -> str:
    for double in (".warc.gz", ".jsonl.gz", ".json.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return double
    return os.path.splitext(name)[1].lower() or "(none)"


def expand_paths(spec: SourceSpec, skipped: Optional[Stats] = None) -> list[str]:
    """All input files of a source, sorted; a path or glob that matches nothing is an error. Files a directory walk
    passes over are counted in `skipped` by extension (`skipped:extension:.xyz`), hidden entries as
    `skipped:hidden`."""
    files: set[str] = set()
    for pattern in spec.paths:
        matches = glob.glob(pattern, recursive=True)
        if not matches:
            raise DataError(f"data.sources[{spec.name}].paths: {pattern!r} matches no files")
        for m in matches:
            if os.path.isfile(m):
                files.add(m)
            elif os.path.isdir(m):
                for root, dirs, names in os.walk(m):
                    hidden = [d for d in dirs if d.startswith(".")] + [n for n in names if n.startswith(".")]
                    if hidden and skipped is not None:
                        count(skipped, "skipped:hidden", len(hidden))
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    for n in names:
                        p = os.path.join(root, n)
                        if n.startswith(".") or not os.path.isfile(p):
                            continue
                        ok = is_code_file(p) if spec.type == "code" else n.endswith(EXTENSIONS.get(spec.type, ("",)))
                        if ok:
                            files.add(p)
                        elif skipped is not None:
                            count(skipped, f"skipped:extension:{_extension(n)}")
    if not files:
        raise DataError(f"data.sources[{spec.name}].paths: no readable {spec.type} files found")
    return sorted(files)


@dataclass
class WorkUnit:
    """A slice of a source's inputs processed as one restartable part."""

    source: str
    files: list[str]

    @property
    def id(self) -> str:
        h = hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:16]
        return f"{self.source}-{h}"


def work_units(spec: SourceSpec, max_files: int = 2000, max_bytes: int = 64 << 20) -> list[WorkUnit]:
    """Group a source's files: big files alone, small ones batched (deterministic, in sorted order)."""
    units: list[Any] = []
    batch: list[Any] = []
    size = 0
    for path in expand_paths(spec):
        n = os.path.getsize(path)
        if n >= max_bytes:
            units.append(WorkUnit(spec.name, [path]))
            continue
        if batch and (len(batch) >= max_files or size + n > max_bytes):
            units.append(WorkUnit(spec.name, batch))
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        units.append(WorkUnit(spec.name, batch))
    return units


def reader_for(kind: str) -> Callable[[str, SourceSpec, Stats], Iterator[Document]]:
    return {
        "text": text.read_text,
        "html": web.read_html_file,
        "warc": web.read_warc,
        "code": code.read_code,
        "latex": latex.read_latex,
        "jsonl": tabular.read_jsonl,
        "parquet": tabular.read_parquet,
    }[kind]


def read_unit(unit: WorkUnit, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    read = reader_for(spec.type)
    for path in unit.files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file disappeared (listed when the work was planned)")
        yield from read(path, spec, stats)
