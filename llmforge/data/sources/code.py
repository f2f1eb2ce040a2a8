"""The Stack-style code: a directory tree of source files, or JSONL records of files; language from the extension."""

from __future__ import annotations

import os
from typing import Iterator

from llmforge.config.data import SourceSpec
from llmforge.data.sources import Document, Stats, count
from llmforge.data.sources.text import decode

LANGUAGES = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "c++", ".cpp": "c++", ".hpp": "c++",
    ".cxx": "c++", ".java": "java", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".tsx": "typescript", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".cs": "c#", ".swift": "swift",
    ".kt": "kotlin", ".scala": "scala", ".sh": "shell", ".bash": "shell", ".lua": "lua", ".r": "r", ".jl": "julia",
    ".hs": "haskell", ".ml": "ocaml", ".sql": "sql", ".html": "html", ".css": "css", ".md": "markdown",
    ".tex": "tex", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".f90": "fortran", ".pl": "perl",
}


def language_of(path: str) -> str | None:
    return LANGUAGES.get(os.path.splitext(path)[1].lower())


def is_code_file(path: str) -> bool:
    return language_of(path) is not None or path.endswith((".jsonl", ".jsonl.gz"))


def read_code(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    """A source file (one document), or a JSONL file of records {text_field, "path"/"lang"?}."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        from llmforge.data.sources.tabular import iter_json_records

        for i, rec in iter_json_records(path, stats):
            text = rec.get(spec.text_field)
            if not isinstance(text, str):
                count(stats, "skipped:no_text_field")
                continue
            file_path = rec.get("path") or rec.get("max_stars_repo_path") or ""
            lang = rec.get("lang") or rec.get("language") or language_of(file_path)
            yield Document(text, f"{path}#{i}", {"path": file_path, "lang": lang, "code": True})
        return
    with open(path, "rb") as f:
        data = f.read()
    yield Document(decode(data, stats), path, {"path": path, "lang": language_of(path), "code": True,
                                               "bytes": len(data)})
