"""arXiv-style LaTeX: `.tex` files or source tarballs → the document body, with comments, the preamble and the
bibliography removed, simple argument-free macros (`\\newcommand`, `\\def`) expanded, sections and math kept."""

from __future__ import annotations

import os
import re
import tarfile
from typing import Iterator, Optional

from llmforge.config.data import SourceSpec
from llmforge.data.sources import Document, Stats, count
from llmforge.data.sources.encoding import decode

_COMMENT = re.compile(r"(?<!\\)%.*")
_NEWCOMMAND = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\s*(\\[A-Za-z]+)\s*\}?\s*\{")
_DEF = re.compile(r"\\def\s*(\\[A-Za-z]+)\s*\{")
_BIB_ENV = re.compile(r"\\begin\{thebibliography\}.*?\\end\{thebibliography\}", re.S)
_BIB_CMDS = re.compile(r"\\(?:bibliography|bibliographystyle|printbibliography|addbibresource)(?:\{[^}]*\})?")
_INPUT = re.compile(r"\\(?:input|include)\{([^}]+)\}")


def _braced(text: str, start: int) -> Optional[tuple[str, int]]:
    """The contents of the brace group opening at text[start-1] == '{', and the index after its closing brace."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i], i + 1
        i += 1
    return None


def strip_comments(tex: str) -> str:
    return "\n".join(_COMMENT.sub("", line) for line in tex.split("\n"))


def collect_macros(tex: str) -> tuple[dict[str, str], str]:
    """Argument-free \\newcommand/\\def definitions, and the text with those definitions removed."""
    macros: dict[str, str] = {}
    out, pos = [], 0
    combined = re.compile(f"{_NEWCOMMAND.pattern}|{_DEF.pattern}")
    for m in combined.finditer(tex):
        if m.start() < pos:
            continue
        name = m.group(1) or m.group(2)
        body = _braced(tex, m.end())
        if body is None:
            continue
        value, end = body
        if "#" not in value:  # macros with arguments are left as they are
            macros[name] = value
            out.append(tex[pos:m.start()])
            pos = end
    out.append(tex[pos:])
    return macros, "".join(out)


def expand_macros(tex: str, macros: dict[str, str], rounds: int = 3) -> str:
    if not macros:
        return tex
    pattern = re.compile("|".join(re.escape(k) + r"(?![A-Za-z])" for k in sorted(macros, key=len, reverse=True)))
    for _ in range(rounds):  # macros defined in terms of other macros
        new = pattern.sub(lambda m: macros[m.group(0)], tex)
        if new == tex:
            break
        tex = new
    return tex


def clean_latex(tex: str, includes: Optional[dict[str, str]] = None) -> str:
    """The body of a LaTeX document as LaTeX source, ready for a language model."""
    tex = strip_comments(tex)
    if includes:
        def inline(m: re.Match) -> str:
            name = m.group(1).strip()
            return strip_comments(includes.get(name) or includes.get(name + ".tex") or "")
        tex = _INPUT.sub(inline, tex)
    macros, tex = collect_macros(tex)
    begin = tex.find("\\begin{document}")
    if begin >= 0:
        tex = tex[begin + len("\\begin{document}"):]
    end = tex.find("\\end{document}")
    if end >= 0:
        tex = tex[:end]
    tex = _BIB_ENV.sub("", tex)
    tex = _BIB_CMDS.sub("", tex)
    tex = expand_macros(tex, macros)
    tex = re.sub(r"\n{3,}", "\n\n", tex)
    return tex.strip()


def _main_file(files: dict[str, str]) -> Optional[str]:
    candidates = [n for n, t in files.items() if "\\begin{document}" in t]
    if not candidates:
        return None
    return max(candidates, key=lambda n: len(files[n]))


def read_latex(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    if path.endswith(".tex"):
        with open(path, "rb") as f:
            yield Document(clean_latex(decode(f.read(), stats)), path, {"path": path})
        return
    try:
        with tarfile.open(path) as tar:
            files = {}
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".tex"):
                    data = tar.extractfile(member)
                    if data is not None:
                        files[os.path.normpath(member.name)] = decode(data.read(), stats)
    except (tarfile.TarError, EOFError, OSError):
        count(stats, "skipped:corrupt_tarball")
        return
    main = _main_file(files)
    if main is None:
        count(stats, "skipped:no_main_tex")
        return
    includes = {}
    for name, text in files.items():
        rel = os.path.relpath(name, os.path.dirname(main)) if os.path.dirname(main) else name
        includes[rel] = text
        includes[rel[:-4]] = text
    yield Document(clean_latex(files[main], includes), f"{path}:{main}", {"path": path})
