"""Plain text files: one file is one document."""

from __future__ import annotations

from typing import Iterator

from llmforge.config.data import SourceSpec
from llmforge.data.sources import Document, Stats, count


def decode(data: bytes, stats: Stats) -> str:
    """UTF-8, with undecodable bytes replaced (and counted)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        count(stats, "repaired:non_utf8")
        return data.decode("utf-8", errors="replace")


def read_text(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    with open(path, "rb") as f:
        yield Document(decode(f.read(), stats), path, {"path": path})
