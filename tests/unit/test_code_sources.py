"""Code and text readers on real files: binaries under source names, non-UTF-8 sources with and without a coding
declaration, CUDA / Makefile / CMake / Dockerfile / notebooks, and every file not read counted by extension."""

from __future__ import annotations

import gzip
import json
import shutil
import sysconfig
from pathlib import Path

from llmforge.config.data import SourceSpec
from llmforge.data.sources import expand_paths, reader_for
from llmforge.data.sources.code import language_of
from llmforge.data.sources.encoding import binary_kind, declared_encoding
from tests.real_inputs import SITE, STDLIB, copy_as, installed

REPO = Path(__file__).resolve().parents[2]


def read_all(spec: SourceSpec) -> tuple[dict, dict]:
    stats: dict = {}
    docs = {Path(d.meta["path"]).name: d for p in expand_paths(spec) for d in reader_for(spec.type)(p, spec, stats)}
    return docs, stats


def test_binary_files_with_source_names_are_skipped_and_counted(tmp_path):
    tree = tmp_path / "repo"
    png = installed("matplotlib/mpl-data/images/*.png", 1)[0]
    copy_as(png, tree / "logo.h")
    copy_as(Path(shutil.which("ls")), tree / "tool.c")  # a real ELF executable
    changelog = next(Path("/usr/share/doc").glob("*/changelog.Debian.gz"))
    copy_as(changelog, tree / "notes.py")  # a real gzip stream
    header = installed("torch/include/ATen/core/*.h", 1)[0]
    copy_as(header, tree / "real.h")
    docs, stats = read_all(SourceSpec(name="c", type="code", paths=[str(tree)]))
    assert set(docs) == {"real.h"}
    assert docs["real.h"].text == header.read_text()
    assert stats["skipped:binary"] == 3
    assert stats["skipped:binary:png"] == stats["skipped:binary:elf"] == stats["skipped:binary:gzip"] == 1
    assert binary_kind(header.read_bytes()) is None


def test_text_starting_like_a_signature_is_still_text(tmp_path):
    for name, text in (
        ("id3.txt", "ID3 tags hold the title and artist of an MP3 file.\n"),
        ("mz.txt", "MZ is how DOS executables begin.\n"),
        ("pdf.md", "%PDF-1.7 is the version line.\n"),
    ):
        (tmp_path / name).write_text(text)
        assert binary_kind(text.encode()) is None
    pdf = installed("matplotlib/mpl-data/images/*.pdf", 1)[0]  # a real PDF: binary whatever follows %PDF-
    assert binary_kind(pdf.read_bytes()) == "pdf"


def test_text_that_decodes_to_mostly_replacement_characters_is_binary(tmp_path):
    # high bytes with no NUL and no signature: charset-normalizer finds no encoding, UTF-8 leaves U+FFFD everywhere
    data = bytes((i * 97 + 13) % 128 + 128 for i in range(4000))
    (tmp_path / "blob.txt").write_bytes(data)
    stats: dict = {}
    docs = list(reader_for("text")(str(tmp_path / "blob.txt"), SourceSpec(name="t", paths=["x"]), stats))
    assert docs == []
    assert stats == {"skipped:binary": 1, "skipped:binary:undecodable": 1}


def _latin1_source() -> tuple[str, str]:
    """A real stdlib module with Latin-1 letters in it (shlex.py: 'ßàáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿ')."""
    text = (STDLIB / "shlex.py").read_text(encoding="utf-8")
    assert "ß" in text and "ü" in text
    return text, "shlex.py"


def test_pep263_coding_line_is_honoured(tmp_path):
    text, _ = _latin1_source()
    declared = "# -*- coding: latin-1 -*-\n" + text
    (tmp_path / "shlex_latin1.py").write_bytes(declared.encode("latin-1"))
    real = STDLIB / "test" / "encoded_modules" / "module_iso_8859_1.py"  # CPython's own Latin-1 test module
    if real.exists():
        shutil.copyfile(real, tmp_path / "module_iso_8859_1.py")
    docs, stats = read_all(SourceSpec(name="c", type="code", paths=[str(tmp_path)]))
    assert docs["shlex_latin1.py"].text == declared
    assert "\ufffd" not in "".join(d.text for d in docs.values())
    if real.exists():
        assert "vérité" in docs["module_iso_8859_1.py"].text
    assert stats["decoded:iso8859-1"] == len(docs)
    assert "repaired:undecodable" not in stats


def test_undeclared_legacy_encoding_goes_to_the_detector(tmp_path):
    text, _ = _latin1_source()
    (tmp_path / "shlex_cp1252.py").write_bytes(text.encode("cp1252"))
    docs, stats = read_all(SourceSpec(name="c", type="code", paths=[str(tmp_path)]))
    out = docs["shlex_cp1252.py"].text
    assert "ß" in out and "ü" in out and "\ufffd" not in out
    assert sum(v for k, v in stats.items() if k.startswith("decoded:")) == 1


def test_declarations_of_other_formats():
    assert declared_encoding(b"\\documentclass{article}\n\\usepackage[latin1]{inputenc}\n") == "iso8859-1"
    assert declared_encoding(b'<?xml version="1.0" encoding="windows-1252"?>\n<a/>') == "cp1252"
    assert declared_encoding(b"#!/usr/bin/env python\n# vim: set fileencoding=koi8-r :\n") == "koi8-r"
    assert declared_encoding(b"x = 1\ny = 2\n# coding: latin-1\n") is None  # only the first two lines count
    assert declared_encoding(b"# coding: no-such-codec\n") is None


def test_cuda_build_files_and_notebooks_are_read_and_everything_else_counted(tmp_path):
    tree = tmp_path / "repo"
    cuh = installed("deepspeed/**/*.cuh", 1)[0]
    cu = installed("deepspeed/**/*.cu", 1)[0]
    cmake = installed("pyarrow/**/CMakeLists.txt", 1)[0]
    copy_as(cuh, tree / "kernels" / cuh.name)
    copy_as(cu, tree / "kernels" / cu.name)
    copy_as(cmake, tree / "CMakeLists.txt")
    copy_as(Path(sysconfig.get_makefile_filename()), tree / "Makefile")
    copy_as(REPO / "docker" / "Dockerfile", tree / "Dockerfile")
    code = (STDLIB / "textwrap.py").read_text().split("\n\n\n")
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"kernelspec": {"language": "python", "name": "python3"}},
        "cells": [
            {"cell_type": "markdown", "source": ["# Text wrapping\n", "The stdlib's textwrap."]},
            {"cell_type": "code", "source": code[1], "outputs": [{"output_type": "stream", "text": "OUTPUT-NOT-KEPT"}]},
            {"cell_type": "raw", "source": "raw cell"},
        ],
    }
    (tree / "demo.ipynb").write_text(json.dumps(notebook))
    (tree / "broken.ipynb").write_text("{not json")
    copy_as(installed("matplotlib/mpl-data/images/*.png", 1)[0], tree / "img" / "figure.png")
    copy_as(installed("torch/**/*.pyc", 1)[0], tree / "cache.pyc")
    (tree / "data.csv").write_text("a,b\n1,2\n")
    (tree / "LICENSE").write_text("license text\n")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")

    skipped: dict = {}
    spec = SourceSpec(name="c", type="code", paths=[str(tree)])
    expand_paths(spec, skipped)
    assert skipped == {
        "skipped:extension:.png": 1,
        "skipped:extension:.pyc": 1,
        "skipped:extension:.csv": 1,
        "skipped:extension:(none)": 1,
        "skipped:hidden": 1,
    }
    docs, stats = read_all(spec)
    assert {n: d.meta["lang"] for n, d in docs.items()} == {
        cuh.name: "cuda",
        cu.name: "cuda",
        "CMakeLists.txt": "cmake",
        "Makefile": "makefile",
        "Dockerfile": "dockerfile",
        "demo.ipynb": "jupyter-python",
    }
    assert docs[cu.name].text == cu.read_text()
    nb = docs["demo.ipynb"].text
    assert nb.startswith("# # Text wrapping\n# The stdlib's textwrap.\n\n") and code[1].strip() in nb
    assert "OUTPUT-NOT-KEPT" not in nb and "raw cell" not in nb
    assert stats["skipped:bad_notebook"] == 1
    assert language_of("x/Dockerfile.gpu") == "dockerfile" and language_of("a/GNUmakefile") == "makefile"


def test_torch_headers_all_read_as_c_or_cuda():
    headers = installed("torch/include/**/*.cuh") + installed("torch/include/c10/**/*.h")
    assert all(language_of(str(h)) in ("c", "cuda") for h in headers)
    stats: dict = {}
    read = reader_for("code")
    spec = SourceSpec(name="c", type="code", paths=[str(SITE)])
    texts = [d.text for h in headers[:300] for d in read(str(h), spec, stats)]
    assert len(texts) == min(300, len(headers)) and not any("\ufffd" in t for t in texts)
    assert "skipped:binary" not in stats


def test_gzip_text_named_txt_is_not_text(tmp_path):
    (tmp_path / "notes.txt").write_bytes(gzip.compress((STDLIB / "this.py").read_bytes()))
    stats: dict = {}
    assert list(reader_for("text")(str(tmp_path / "notes.txt"), SourceSpec(name="t", paths=["x"]), stats)) == []
    assert stats == {"skipped:binary": 1, "skipped:binary:gzip": 1}
