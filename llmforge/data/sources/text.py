"""Plain text files: one file is one document (split into held-out ranges later when it is large)."""

from __future__ import annotations

from collections.abc import Iterator

from llmforge.config.data import SourceSpec
from llmforge.data.sources.base import Document, Stats
from llmforge.data.sources.encoding import read_text_file


def read_text(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    with open(path, "rb") as f:
        text = read_text_file(f.read(), stats)
    if text is not None:
        yield Document(text, path, {"path": path})
