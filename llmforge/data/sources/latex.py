"""arXiv-style LaTeX: `.tex` files or source tarballs → the document body, with comments, the preamble and the
bibliography removed, simple argument-free macros (`\\newcommand`, `\\def`) expanded, sections and math kept."""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import Optional

from llmforge.config.data import SourceSpec
from llmforge.data.sources.base import Document, Stats, count
from llmforge.data.sources.encoding import decode

log = logging.getLogger(__name__)

_COMMENT = re.compile(r"(?<!\\)%.*")
_NEWCOMMAND = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\s*(\\[A-Za-z]+)\s*\}?\s*\{")
_DEF = re.compile(r"\\def\s*(\\[A-Za-z]+)\s*\{")
_BIB_ENV = re.compile(r"\\begin\{thebibliography\}.*?\\end\{thebibliography\}", re.S)
_BIB_CMDS = re.compile(
    r"\\(?:bibliographystyle|bibliography|printbibliography|addbibresource|nocite)(?![A-Za-z])"
    r"\*?(?:\[[^\]]*\])?(?:\{[^}]*\})?"
)


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
            out.append(tex[pos : m.start()])
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


_INCLUDE = re.compile(
    r"\\(?:input|include|subfile|subfileinclude)(?![A-Za-z])\s*\{([^{}]+)\}"  # \input{x}, \include{x}, \subfile{x}
    r"|\\input(?![A-Za-z])[ \t]+([^\s{}\\%]+)"  # TeX's \input x
    r"|\\(?:sub)?(?:import|inputfrom|includefrom)\*?\s*\{([^{}]*)\}\s*\{([^{}]+)\}"
)  # \import{dir/}{x}
_DOCUMENT = re.compile(r"\\documentclass|\\begin\{document\}")
MAX_INCLUDE_DEPTH = 20
TEX_EXTENSIONS = (".tex", ".ltx")


class Sources:
    """The .tex files of one paper (a tarball's members or a directory on disk), looked up as LaTeX does: relative
    to the root file's directory, with `.tex` appended when the name has no extension."""

    def __init__(self, files: dict[str, str], other: Optional[set[str]] = None):
        self.files = files  # normalised relative path -> text
        self.other = other or set()  # members that exist but are not .tex (figures, .bbl, ...)

    def find(self, name: str, base: str) -> Optional[str]:
        name = name.strip().strip('"')
        for candidate in (name, name + ".tex"):
            path = os.path.normpath(os.path.join(base, candidate))
            if path in self.files or path in self.other:
                return path
        return None


def resolve_includes(
    tex: str,
    sources: Sources,
    base: str,
    stats: Stats,
    stack: tuple[str, ...] = (),
    missing: Optional[list[str]] = None,
) -> str:
    """`tex` with every include replaced by the included file's text (comments removed first, so commented-out
    includes stay out), recursively. Missing files, includes of other formats, cycles and nesting deeper than
    MAX_INCLUDE_DEPTH are counted (`latex:missing_include`, `latex:include_not_tex`, `latex:include_cycle`,
    `latex:include_too_deep`) and replaced by nothing."""
    tex = strip_comments(tex)
    in_document = bool(_DOCUMENT.search(tex))  # else a wrapper (options, then \input{main}): inlines whole files

    def inline(m: re.Match) -> str:
        if m.group(4) is not None:  # \import{dir}{file}: the file's own includes are relative to dir
            name, sub_base = m.group(4), os.path.normpath(os.path.join(base, m.group(3) or "."))
            path = sources.find(name, sub_base)
        else:
            name, sub_base = m.group(1) or m.group(2), base
            path = sources.find(name, base)
        if path is None:
            count(stats, "latex:missing_include")
            if missing is not None:
                missing.append(name.strip())
            return ""
        if path not in sources.files:
            count(stats, "latex:include_not_tex")
            return ""
        if path in stack:
            count(stats, "latex:include_cycle")
            return ""
        if len(stack) >= MAX_INCLUDE_DEPTH:
            count(stats, "latex:include_too_deep")
            return ""
        count(stats, "latex:included_files")
        body = sources.files[path]
        if in_document and "\\begin{document}" in body:  # a subfiles-style chapter: only its body joins the parent
            body = body.split("\\begin{document}", 1)[1].split("\\end{document}", 1)[0]
        return resolve_includes(body, sources, sub_base, stats, stack + (path,), missing)

    return _INCLUDE.sub(inline, tex)


def clean_latex(tex: str, includes: Optional[dict[str, str]] = None, stats: Optional[Stats] = None) -> str:
    """The body of a LaTeX document as LaTeX source, ready for a language model. `includes` maps file names (relative
    to the document) to their text for \\input/\\include."""
    stats = {} if stats is None else stats
    sources = Sources({os.path.normpath(k): v for k, v in (includes or {}).items()})
    return _clean_body(resolve_includes(tex, sources, "", stats))


def _clean_body(tex: str) -> str:
    """Macros expanded, preamble and bibliography dropped, of a document whose includes are resolved."""
    macros, tex = collect_macros(tex)
    begin = tex.find("\\begin{document}")
    if begin >= 0:
        tex = tex[begin + len("\\begin{document}") :]
    end = tex.find("\\end{document}")
    if end >= 0:
        tex = tex[:end]
    tex = _BIB_ENV.sub("", tex)
    tex = _BIB_CMDS.sub("", tex)
    tex = expand_macros(tex, macros)
    tex = re.sub(r"\n{3,}", "\n\n", tex)
    return tex.strip()


def _referenced(sources: Sources, path: str) -> set[str]:
    """Files `path` includes directly (resolved relative to its own directory and the archive root)."""
    out = set()
    for m in _INCLUDE.finditer(strip_comments(sources.files[path])):
        name = m.group(4) if m.group(4) is not None else m.group(1) or m.group(2)
        base = os.path.join(m.group(3) or "", "") if m.group(4) is not None else ""
        for b in (os.path.dirname(path), ""):
            found = sources.find(os.path.join(base, name), b)
            if found is not None:
                out.add(found)
    return out


def documents(sources: Sources, stats: Stats, label: str) -> list[tuple[str, str]]:
    """(root path, cleaned text) of every document in a paper's sources, the main one first.

    Roots are the files that no other file includes and whose resolved text starts a document (\\documentclass or
    \\begin{document}): a wrapper that sets options and then \\input-s the file with the \\documentclass is a root,
    though neither it nor the included file would be one by its own text (a book's hott-online.tex and hott-ebook.tex
    around main.tex). The main document is the root whose resolved text is longest (not the longest file: a main.tex
    that \\includes fifteen chapters is short itself). Other roots (a supplement, a response letter) are documents
    of their own (`latex:extra_documents`); roots whose cleaned text equals an earlier one's (wrappers of the same
    document) are counted as `latex:duplicate_documents` and kept once; .tex files no root reaches are counted as
    `skipped:latex_unreferenced`."""
    included = set().union(*(_referenced(sources, p) for p in sources.files)) if sources.files else set()
    out, reached = [], set()
    for root in sorted(p for p in sources.files if p not in included):
        missing: list[str] = []
        local: Stats = {}  # counted only for a root
        resolved = resolve_includes(sources.files[root], sources, os.path.dirname(root), local, (root,), missing)
        if not _DOCUMENT.search(resolved):
            continue
        for key, n in local.items():
            count(stats, key, n)
        text = _clean_body(resolved)
        if missing:
            log.warning(
                "%s:%s: %d included file(s) not found: %s",
                label,
                root,
                len(missing),
                ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            )
        reached |= _closure(sources, root)
        out.append((root, text))
    if not out:
        return []
    out.sort(key=lambda rt: -len(rt[1]))
    kept: dict[str, str] = {}
    for root, text in out:
        kept.setdefault(text, root)
    if len(kept) < len(out):
        count(stats, "latex:duplicate_documents", len(out) - len(kept))
    if len(kept) > 1:
        count(stats, "latex:extra_documents", len(kept) - 1)
    unreferenced = [p for p in sources.files if p not in reached]
    if unreferenced:
        count(stats, "skipped:latex_unreferenced", len(unreferenced))
    return [(root, text) for text, root in kept.items()]


def _closure(sources: Sources, root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in seen or p not in sources.files:
            continue
        seen.add(p)
        todo.extend(_referenced(sources, p))
    return seen


def read_latex(path: str, spec: SourceSpec, stats: Stats) -> Iterator[Document]:
    """A paper's documents: from a source tarball, or from a .tex file with the files it includes read from its
    directory. A .tex file that starts no document (a chapter) is left to the root that includes it and counted as
    `skipped:latex_not_root`."""
    if path.endswith(TEX_EXTENSIONS):
        with open(path, "rb") as f:
            tex = decode(f.read(), stats)
        sources = _DiskSources(os.path.dirname(path), stats)
        stack = (os.path.basename(path),)
        if not _DOCUMENT.search(strip_comments(tex)) and not _DOCUMENT.search(
            resolve_includes(tex, sources, "", {}, stack)
        ):  # neither starts a document itself nor \input-s the file that does (a wrapper)
            count(stats, "skipped:latex_not_root")
            return
        missing: list[str] = []
        text = _clean_body(resolve_includes(tex, sources, "", stats, stack, missing))
        if missing:
            log.warning("%s: %d included file(s) not found: %s", path, len(missing), ", ".join(missing[:5]))
        yield Document(text, path, {"path": path})
        return
    try:
        with tarfile.open(path) as tar:
            files, other = {}, set()
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                name = os.path.normpath(member.name)
                if name.lower().endswith(TEX_EXTENSIONS):
                    data = tar.extractfile(member)
                    if data is not None:
                        files[name] = decode(data.read(), stats)
                else:
                    other.add(name)
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        count(stats, "skipped:corrupt_tarball")
        return
    docs = documents(Sources(files, other), stats, path)
    if not docs:
        count(stats, "skipped:no_main_tex")
        return
    for root, text in docs:
        yield Document(text, f"{path}:{root}", {"path": path, "root": root})


class _DiskSources(Sources):
    """Sources read from a directory on demand (for a .tex file named directly or found by a directory walk); a
    file's decoding is counted in the source's stats like any other."""

    def __init__(self, directory: str, stats: Stats):
        super().__init__({})
        self.directory, self.stats = directory, stats

    def find(self, name: str, base: str) -> Optional[str]:
        clean = name.strip().strip('"')
        for candidate in (clean, clean + ".tex"):
            rel = os.path.normpath(os.path.join(base, candidate))
            full = os.path.join(self.directory, rel)
            if rel in self.files or rel in self.other or not os.path.isfile(full):
                continue
            if rel.lower().endswith(TEX_EXTENSIONS):
                with open(full, "rb") as f:
                    self.files[rel] = decode(f.read(), self.stats)
            else:
                self.other.add(rel)
        return super().find(name, base)
