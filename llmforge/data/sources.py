"""Raw document sources. This version reads local text files and globs: one file is one document."""

from __future__ import annotations

import glob
import os
from typing import Iterator

from llmforge.errors import DataError


def expand_sources(patterns: list[str]) -> list[str]:
    """Files matched by the patterns (recursive `**` allowed), sorted and de-duplicated; an empty match is an error."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"data.sources: {pattern!r} matches no files")
        for path in matches:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def iter_text_documents(patterns: list[str]) -> Iterator[tuple[str, str]]:
    """(path, text) for every matched file, decoded as UTF-8 (undecodable bytes replaced)."""
    for path in expand_sources(patterns):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield path, f.read()
