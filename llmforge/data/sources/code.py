"""The Stack-style code: a directory tree of source files, or JSONL records of files; language from the file name.

Files whose content is not text (a PNG saved as `.h`, an ELF binary, a gzip stream) are skipped and counted
(`skipped:binary:<kind>`); encodings other than UTF-8 are honoured (PEP 263 coding lines, then a detector; see
`encoding.py`). Jupyter notebooks become one document of their markdown (as comments) and code cells, outputs dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Optional

from llmforge.config.data import SourceSpec
from llmforge.data.sources.base import Document, Stats, count
from llmforge.data.sources.encoding import read_text_file
from llmforge.data.sources.tabular import iter_json_records

LANGUAGES = {
    ".py": "python",
    ".pyi": "python",
    ".pyx": "cython",
    ".pxd": "cython",
    ".c": "c",
    ".h": "c",
    ".cc": "c++",
    ".cpp": "c++",
    ".cxx": "c++",
    ".c++": "c++",
    ".hpp": "c++",
    ".hh": "c++",
    ".hxx": "c++",
    ".h++": "c++",
    ".ipp": "c++",
    ".inl": "c++",
    ".tpp": "c++",
    ".cu": "cuda",
    ".cuh": "cuda",
    ".m": "objective-c",
    ".mm": "objective-c++",
    ".java": "java",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".scala": "scala",
    ".sc": "scala",
    ".groovy": "groovy",
    ".gradle": "groovy",
    ".clj": "clojure",
    ".cljs": "clojure",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".mts": "typescript",
    ".vue": "vue",
    ".svelte": "svelte",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".cs": "c#",
    ".fs": "f#",
    ".vb": "visual-basic",
    ".swift": "swift",
    ".dart": "dart",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".fish": "shell",
    ".ps1": "powershell",
    ".bat": "batchfile",
    ".cmd": "batchfile",
    ".lua": "lua",
    ".r": "r",
    ".jl": "julia",
    ".hs": "haskell",
    ".ml": "ocaml",
    ".mli": "ocaml",
    ".ex": "elixir",
    ".exs": "elixir",
    ".erl": "erlang",
    ".el": "emacs-lisp",
    ".lisp": "lisp",
    ".scm": "scheme",
    ".nim": "nim",
    ".zig": "zig",
    ".d": "d",
    ".pas": "pascal",
    ".f": "fortran",
    ".f77": "fortran",
    ".f90": "fortran",
    ".f95": "fortran",
    ".f03": "fortran",
    ".pl": "perl",
    ".pm": "perl",
    ".tcl": "tcl",
    ".awk": "awk",
    ".sql": "sql",
    ".proto": "protocol-buffer",
    ".graphql": "graphql",
    ".s": "assembly",
    ".asm": "assembly",
    ".v": "verilog",
    ".sv": "systemverilog",
    ".vhd": "vhdl",
    ".vhdl": "vhdl",
    ".html": "html",
    ".css": "css",
    ".scss": "scss",
    ".sass": "sass",
    ".less": "less",
    ".md": "markdown",
    ".rst": "restructuredtext",
    ".tex": "tex",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".ini": "ini",
    ".cfg": "ini",
    ".cmake": "cmake",
    ".mk": "makefile",
    ".bzl": "starlark",
    ".tf": "hcl",
    ".hcl": "hcl",
    ".dockerfile": "dockerfile",
    ".ipynb": "jupyter",
}
# Files recognised by their whole name (no or a misleading extension).
FILE_NAMES = {
    "makefile": "makefile",
    "gnumakefile": "makefile",
    "cmakelists.txt": "cmake",
    "dockerfile": "dockerfile",
    "containerfile": "dockerfile",
    "meson.build": "meson",
    "build": "starlark",
    "build.bazel": "starlark",
    "workspace": "starlark",
    "jenkinsfile": "groovy",
    "vagrantfile": "ruby",
    "gemfile": "ruby",
    "rakefile": "ruby",
    "sconstruct": "python",
    "sconscript": "python",
}


def language_of(path: str) -> Optional[str]:
    name = os.path.basename(path).lower()
    if name in FILE_NAMES:
        return FILE_NAMES[name]
    if name.startswith("dockerfile."):
        return "dockerfile"
    return LANGUAGES.get(os.path.splitext(name)[1])


def is_code_file(path: str) -> bool:
    return language_of(path) is not None or path.endswith((".jsonl", ".jsonl.gz"))


def notebook_text(raw: str) -> Optional[tuple[str, str]]:
    """(text, language) of a Jupyter notebook: code cells as they are, markdown cells as comments of the kernel's
    language; None for a file that is not a notebook."""
    try:
        nb = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return None
    meta = nb.get("metadata") or {}
    language = str(
        (meta.get("kernelspec") or {}).get("language") or (meta.get("language_info") or {}).get("name") or "python"
    ).lower()
    comment = (
        "//"
        if language in ("c++", "c", "java", "javascript", "typescript", "scala", "go", "rust")
        else "--"
        if language in ("sql", "haskell", "lua")
        else "#"
    )
    parts = []
    for cell in nb["cells"]:
        if not isinstance(cell, dict):
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        if not source.strip():
            continue
        if cell.get("cell_type") == "code":
            parts.append(source.rstrip())
        elif cell.get("cell_type") == "markdown":
            parts.append("\n".join(f"{comment} {line}".rstrip() for line in source.rstrip().split("\n")))
    return "\n\n".join(parts) + "\n", language


def read_code(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    """A source file (one document), or a JSONL file of records {text_field, "path"/"lang"?}."""
    if path.endswith((".jsonl", ".jsonl.gz")):
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
    text = read_text_file(data, stats)
    if text is None:
        return
    lang = language_of(path)
    if lang == "jupyter":
        nb = notebook_text(text)
        if nb is None:
            count(stats, "skipped:bad_notebook")
            return
        text, kernel = nb
        lang = f"jupyter-{kernel}"
        data = text.encode("utf-8")
    yield Document(text, path, {"path": path, "lang": lang, "code": True, "bytes": len(data)})
