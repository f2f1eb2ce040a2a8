"""JSONL / JSON.gz / Parquet records with a configurable text field, streamed through Hugging Face `datasets`."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any, Optional

from llmforge.config.data import SourceSpec
from llmforge.data.sources.base import Document, Stats, count
from llmforge.errors import DataError


def iter_json_records(path: str, stats: Stats) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL file (gzip by extension); bad lines and a truncated gzip are counted."""
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        i = 0
        while True:
            try:
                line = f.readline()
            except (EOFError, OSError):  # truncated or corrupt gzip stream
                count(stats, "skipped:corrupt_gzip")
                return
            if not line:
                return
            i += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                count(stats, "skipped:bad_json_line")
                continue
            if isinstance(rec, dict):
                yield i, rec
            else:
                count(stats, "skipped:bad_json_line")


def record_to_document(rec: dict, doc_id: str, spec: SourceSpec, stats: Stats) -> Optional[Document]:
    """The record's text field as a Document (url/id/date/lang kept), or None (counted) when it has none."""
    text = rec.get(spec.text_field)
    if not isinstance(text, str):
        count(stats, "skipped:no_text_field")
        return None
    meta = {k: rec[k] for k in ("url", "id", "date", "lang") if k in rec and isinstance(rec[k], (str, int))}
    return Document(text, doc_id, meta)


def _from_dataset(path: str, builder: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    import datasets

    ds = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
    for i, rec in enumerate(ds):
        doc = record_to_document(rec, f"{path}#{i}", spec, stats)
        if doc is not None:
            yield doc


def read_jsonl(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    """JSONL or JSON.gz. Read line by line here (not via `datasets`) so one bad line is skipped, not fatal."""
    for i, rec in iter_json_records(path, stats):
        doc = record_to_document(rec, f"{path}#{i}", spec, stats)
        if doc is not None:
            yield doc


def read_parquet(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    try:
        yield from _from_dataset(path, "parquet", spec, stats)
    except Exception as e:  # pyarrow raises several types for a damaged file
        if "parquet" in type(e).__module__ or "arrow" in type(e).__module__ or isinstance(e, (OSError, ValueError)):
            raise DataError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
        raise
