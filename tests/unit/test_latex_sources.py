"""LaTeX on a real multi-file document: cxref's example (Debian's cxref-doc), a `cxref.tex` that \\input-s 27
generated files (26 chapters and an appendix), packed as an arXiv-style tarball or read from its directory; the
include graph resolved recursively, roots chosen by the graph, every missing include and every other document
counted."""

from __future__ import annotations

import io
import logging
import re
import tarfile

from llmforge.config.data import SourceSpec
from llmforge.data.sources import expand_paths, reader_for
from llmforge.data.sources.latex import MAX_INCLUDE_DEPTH, clean_latex
from tests.real_inputs import CXREF_EXAMPLES, cxref_tarball, require


def read_all(spec: SourceSpec) -> tuple[list, dict]:
    stats: dict = {}
    docs = [d for path in expand_paths(spec) for d in reader_for("latex")(path, spec, stats)]
    return docs, stats


def chapters() -> list[str]:
    main = (require(CXREF_EXAMPLES, "cxref-doc") / "cxref.tex").read_text()
    return re.findall(r"\\input\{([^}]+)\}", main)


def headings(name: str) -> list[str]:
    """The \\section headings of one chapter file: what must reach the document when it is included."""
    return re.findall(r"\\section\{[^}]*\}", (CXREF_EXAMPLES / name).read_text())


def spec_for(path) -> SourceSpec:
    return SourceSpec(name="papers", type="latex", paths=[str(path)])


def test_real_tarball_resolves_every_chapter(tmp_path):
    cxref_tarball(tmp_path / "cxref.tar.gz")
    (doc,), stats = read_all(spec_for(tmp_path / "cxref.tar.gz"))
    names = chapters()
    assert len(names) == 27
    for name in names:
        for heading in headings(name):
            assert heading in doc.text, (name, heading)
    assert "\\input" not in doc.text and "\\documentclass" not in doc.text and "\\tableofcontents" in doc.text
    assert stats["latex:included_files"] == 27 and "latex:missing_include" not in stats
    assert doc.meta["root"] == "cxref.tex"
    assert "\\#include" in doc.text  # C's #include inside the chapters is text, not a LaTeX include


def test_missing_includes_are_counted_and_logged(tmp_path, caplog):
    names = chapters()
    keep = {n: (CXREF_EXAMPLES / n).read_bytes() for n in names[2:]}
    main = (CXREF_EXAMPLES / "cxref.tex").read_bytes()
    with tarfile.open(tmp_path / "p.tar.gz", "w:gz") as tar:
        for name, data in {"cxref.tex": main, **keep}.items():
            path = tmp_path / "m" / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            tar.add(path, arcname=name)
    with caplog.at_level(logging.WARNING, logger="llmforge.data.sources.latex"):
        (doc,), stats = read_all(spec_for(tmp_path / "p.tar.gz"))
    assert stats["latex:missing_include"] == 2 and stats["latex:included_files"] == 25
    assert names[0] in caplog.text and names[1] in caplog.text and "2 included file(s) not found" in caplog.text
    assert headings(names[2])[0] in doc.text


def test_nested_includes_and_the_main_file_chosen_by_the_graph(tmp_path):
    """The main file includes one file that includes the 27 chapters (two levels, chapters in a subdirectory),
    and a standalone document larger than the main file sits beside it (an exercise-solutions file): the main
    document is the one with the most resolved text; the other is a document of its own, and a .tex file nothing
    includes is counted."""
    names = chapters()
    main = (CXREF_EXAMPLES / "cxref.tex").read_text()
    inputs = "\n".join(f"\\input{{src/{n}}}" for n in names)
    main = re.sub(r"(\\input\{[^}]+\}\s*)+", "\\\\input{parts/all}\n", main, count=1)
    main = re.sub(r"\\input\{cxref\.[a-z]+\.tex\}", "", main)
    solutions = (
        "\\documentclass{article}\n\\begin{document}\n"
        + (CXREF_EXAMPLES / "parse-lex.c.tex").read_text()
        + "\n\\end{document}\n"
    )
    assert len(solutions) > len(main)
    extra = {
        "parts/all.tex": inputs.encode(),
        "solutions.tex": solutions.encode(),
        "unused-notes.tex": b"\\section{Notes}\nNever included.\n",
    }
    cxref_tarball(tmp_path / "nested.tar.gz", extra=extra, prefix="src/")
    with tarfile.open(tmp_path / "nested.tar.gz") as tar:  # the main file moves to the top
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    members["main.tex"] = main.encode()
    del members["src/cxref.tex"]
    with tarfile.open(tmp_path / "paper.tar.gz", "w:gz") as tar:
        for name, data in sorted(members.items()):
            (tmp_path / "x").write_bytes(data)
            tar.add(tmp_path / "x", arcname=name)
    docs, stats = read_all(spec_for(tmp_path / "paper.tar.gz"))
    assert [d.meta["root"] for d in docs] == ["main.tex", "solutions.tex"]
    text = docs[0].text
    assert "\\input" not in text
    for name in names:
        assert headings(name)[0] in text, name
    assert stats["latex:extra_documents"] == 1
    assert stats["skipped:latex_unreferenced"] == 1  # unused-notes.tex
    assert stats["latex:included_files"] == 28  # parts/all.tex and the 27 files it includes


def test_directory_of_tex_files_reads_the_root_with_its_includes():
    root = require(CXREF_EXAMPLES, "cxref-doc")
    (doc,), stats = read_all(spec_for(root))
    assert doc.meta["path"].endswith("cxref.tex")
    assert stats["latex:included_files"] == 27
    fragments = len(list(root.glob("*.tex"))) - 1
    assert stats["skipped:latex_not_root"] == fragments  # the included files, read through the root instead
    assert headings("memory.c.tex")[0] in doc.text


def test_cycles_and_depth_are_bounded():
    files = {"a.tex": "A \\input{b}", "b.tex": "B \\input{a}"}
    stats: dict = {}
    out = clean_latex("\\begin{document}\\input{a}\\end{document}", files, stats)
    assert out == "A B A" or out.count("A") <= 2
    assert stats["latex:include_cycle"] == 1
    chain = {f"f{i}.tex": f"level{i} \\input{{f{i + 1}}}" for i in range(MAX_INCLUDE_DEPTH + 5)}
    stats = {}
    out = clean_latex("\\input{f0}", chain, stats)
    assert f"level{MAX_INCLUDE_DEPTH - 1}" in out and f"level{MAX_INCLUDE_DEPTH + 1}" not in out
    assert stats["latex:include_too_deep"] == 1


def test_bibliography_commands_leave_nothing_behind():
    tex = (
        "\\begin{document}Text.\\bibliographystyle{abbrv}\n\\bibliography{refs,more}\n\\nocite{*}"
        "\\printbibliography[heading=none]\\end{document}"
    )
    assert clean_latex(tex) == "Text."


def test_a_book_behind_wrapper_files_is_one_document(tmp_path):
    """A book's shape (the HoTT book's hott-online.tex, hott-ebook.tex, ... around main.tex), built from cxref's real
    TeX: wrappers that set an option and \\input{main}, a main.tex with the \\documentclass that \\input-s 27 chapters,
    an errata document beside them. Neither a wrapper (no \\documentclass of its own) nor main.tex (included) is a
    root by its own text; by their resolved text the wrappers are, and their identical documents are kept once."""
    root = require(CXREF_EXAMPLES, "cxref-doc")
    members = {f.name: f.read_bytes() for f in sorted(root.iterdir()) if f.suffix in (".tex", ".sty")}
    members["main.tex"] = members.pop("cxref.tex")
    for kind in ("online", "ebook", "letter"):
        members[f"book-{kind}.tex"] = f"\\def\\bookformat{{{kind}}}\n\\input{{main}}\n".encode()
    members["errata.tex"] = b"\\documentclass{article}\n\\begin{document}\nErrata: a typo on page 3.\n\\end{document}\n"
    with tarfile.open(tmp_path / "book.tar.gz", "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    docs, stats = read_all(spec_for(tmp_path / "book.tar.gz"))
    assert [d.meta["root"] for d in docs] == ["book-ebook.tex", "errata.tex"]
    book = docs[0].text
    for name in chapters():
        for heading in headings(name):
            assert heading in book, (name, heading)
    assert "\\documentclass" not in book and "\\input" not in book
    assert stats["latex:duplicate_documents"] == 2 and stats["latex:extra_documents"] == 1
    assert "skipped:latex_unreferenced" not in stats

    # read from a directory, a wrapper named on its own is a document too (the book's text, from main.tex)
    for name, data in members.items():
        (tmp_path / name).write_bytes(data)
    (wrapper,), _ = read_all(spec_for(tmp_path / "book-online.tex"))
    assert wrapper.text == book
