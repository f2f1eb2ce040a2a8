"""Readers, cleaning and quality filters on small real inputs built here: WARC (warcio) with realistic pages, a code
tree, LaTeX files and a source tarball, JSONL / JSON.gz / Parquet."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from llmforge.config.data import CodeFilters, SourceSpec, WebFilters
from llmforge.data.filters import code_quality, web_quality
from llmforge.data.sources import expand_paths, reader_for, work_units
from llmforge.data.sources.latex import clean_latex
from llmforge.errors import DataError

ARTICLE = [
    "The city council met on Tuesday evening to debate the water budget, which has grown steadily since the new "
    "treatment plant opened three years ago.",
    "Residents from the older neighbourhoods raised concerns about rising rates and the reliability of service, "
    "pointing to several long outages during the winter months.",
    "The finance committee proposed spreading the cost of new pipes over fifteen years, a plan that would keep the "
    "monthly increase for an average household below four dollars.",
    "A final vote is expected next month after the public consultation closes and the engineers publish their report.",
    "Until then, the council has asked every household to report leaks and to water gardens only after sunset.",
]


def page(title: str, paragraphs: list[str]) -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f"""<!doctype html><html><head><title>{title}</title><script>var tracking = 1;</script></head><body>
<header><nav><a href="/">Home</a> | <a href="/news">News</a> | <a href="/sport">Sport</a> | <a href="/contact">Contact
</a></nav></header><div class="cookie-banner">We use cookies to improve your experience. Accept all cookies.</div>
<main><article><h1>{title}</h1>{body}</article></main>
<aside><h3>Most read</h3><ul><li><a href="/a">Ten tips for a greener garden</a></li>
<li><a href="/b">Local team wins the cup</a></li></ul></aside>
<footer><p>Copyright 2024 The City Paper. All rights reserved.</p><a href="/privacy">Privacy policy</a></footer>
</body></html>"""


def write_warc(path: Path, pages: list[tuple[str, str]], gz: bool = True) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gz)
        for url, html in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode()), http_headers=headers)
            )
        img = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
        writer.write_record(
            writer.create_warc_record(
                "http://x.test/logo.png", "response", payload=io.BytesIO(b"\x89PNG...."), http_headers=img
            )
        )


def read_all(spec: SourceSpec) -> tuple[list, dict]:
    stats: dict = {}
    docs = [d for path in expand_paths(spec) for d in reader_for(spec.type)(path, spec, stats)]
    return docs, stats


def test_warc_extracts_main_text_and_drops_boilerplate(tmp_path):
    write_warc(tmp_path / "a.warc.gz", [("http://news.test/water", page("Council debates water budget", ARTICLE))])
    for extractor in ("resiliparse", "trafilatura"):
        docs, stats = read_all(
            SourceSpec(name="web", type="warc", paths=[str(tmp_path / "*.warc.gz")], extractor=extractor)
        )
        (doc,) = docs
        assert stats["skipped:not_html"] == 1
        assert doc.meta["url"] == "http://news.test/water" and doc.meta["date"].startswith("20")
        for sentence in ARTICLE:
            assert sentence in doc.text
        for boiler in ("cookies", "Privacy policy", "Ten tips", "Copyright", "tracking", "Sport"):
            assert boiler not in doc.text, (extractor, boiler)


def test_corrupt_warc_is_skipped_and_counted(tmp_path):
    write_warc(tmp_path / "good.warc.gz", [(f"http://x.test/{i}", page(f"Story {i}", ARTICLE)) for i in range(3)])
    data = (tmp_path / "good.warc.gz").read_bytes()
    (tmp_path / "bad.warc.gz").write_bytes(data[: len(data) // 2] + b"\x00garbage" * 20)
    docs, stats = read_all(SourceSpec(name="web", type="warc", paths=[str(tmp_path / "bad.warc.gz")]))
    assert [d.meta["url"] for d in docs] == ["http://x.test/0"]  # the record cut in half is not kept
    assert stats["skipped:corrupt_warc"] == 1


def test_html_files_and_plain_text(tmp_path):
    (tmp_path / "p.html").write_text(page("Water", ARTICLE))
    (docs, _) = read_all(SourceSpec(name="h", type="html", paths=[str(tmp_path)]))
    assert ARTICLE[0] in docs[0].text and "cookies" not in docs[0].text
    (tmp_path / "t.txt").write_bytes("caf\xe9 ok ".encode("latin-1") + "naïve".encode())
    docs, stats = read_all(SourceSpec(name="t", type="text", paths=[str(tmp_path / "t.txt")]))
    assert docs[0].text.endswith("naïve") and stats["repaired:invalid-utf-8"] == 1
    assert stats["repaired:replacement_chars"] == 1


def test_code_tree_language_and_filters(tmp_path):
    tree = tmp_path / "repo"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "util.py").write_text("def add(a, b):\n    return a + b\n")
    (tree / "main.go").write_text("package main\n\nfunc main() {}\n")
    (tree / "min.js").write_text("var a=1;" * 400)
    (tree / "gen.py").write_text("# Code generated by protoc. DO NOT EDIT.\nx = 1\n")
    (tree / "notes.bin").write_bytes(b"\x00\x01")
    docs, _ = read_all(SourceSpec(name="code", type="code", paths=[str(tree)]))
    by_path = {Path(d.meta["path"]).name: d for d in docs}
    assert set(by_path) == {"util.py", "main.go", "min.js", "gen.py"}  # notes.bin is not code
    assert by_path["util.py"].meta["lang"] == "python" and by_path["main.go"].meta["lang"] == "go"
    cfg = CodeFilters(max_line_length=1000)
    assert code_quality(by_path["util.py"].text, cfg) is None
    assert code_quality(by_path["min.js"].text, cfg) == "line_too_long"
    assert code_quality(by_path["gen.py"].text, cfg) == "auto_generated"
    assert code_quality("x = 1\n" * 10, CodeFilters(max_bytes=20)) == "file_too_large"
    assert code_quality("{}[]();;\n" * 5 + "a\n", cfg) == "low_alnum_fraction"
    assert code_quality(("y" * 150 + "\n") * 3, cfg) == "mean_line_too_long"


def test_code_jsonl_records(tmp_path):
    rows = [{"content": "fn main() {}\n", "path": "src/main.rs"}, {"content": 3}, {"path": "x"}]
    (tmp_path / "stack.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    docs, stats = read_all(
        SourceSpec(name="c", type="code", paths=[str(tmp_path / "stack.jsonl")], text_field="content")
    )
    assert [d.meta["lang"] for d in docs] == ["rust"]
    assert stats["skipped:no_text_field"] == 2 and stats["skipped:bad_json_line"] == 1


LATEX = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\R}{\mathbb{R}}
\def\eps{\varepsilon}
\newcommand{\norm}[1]{\left\| #1 \right\|}
\title{Secret preamble title}
\begin{document}
\maketitle
% TODO: remove this private remark
\section{Introduction}
Let $x \in \R$ and \eps > 0; then 50\% of $\norm{x}$ holds.
\input{method}
\begin{equation} \int_0^1 f(x)\,dx = 1 \end{equation}
\bibliographystyle{plain}
\bibliography{refs}
\begin{thebibliography}{9}\bibitem{a} A. Author, A paper title.\end{thebibliography}
\end{document}
"""


def test_latex_cleaning():
    out = clean_latex(LATEX, {"method": "\\section{Method}\nWe use $\\R^n$. % hidden\n"})
    assert out.startswith("\\maketitle")
    assert "Secret preamble" not in out and "TODO" not in out and "hidden" not in out
    assert "A. Author" not in out and "bibliography" not in out
    assert "$x \\in \\mathbb{R}$" in out and "\\varepsilon > 0" in out and "50\\%" in out
    assert "\\norm{x}" in out  # macros with arguments are kept as they are
    assert "\\section{Introduction}" in out and "\\section{Method}" in out and "$\\mathbb{R}^n$" in out
    assert "\\int_0^1 f(x)" in out


def test_latex_tarball_and_tex_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.tex").write_text(LATEX)
    (src / "method.tex").write_text("\\section{Method}\nDetails.\n")
    with tarfile.open(tmp_path / "2401.00001.tar.gz", "w:gz") as tar:
        tar.add(src / "main.tex", arcname="main.tex")
        tar.add(src / "method.tex", arcname="method.tex")
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball at all")
    docs, stats = read_all(SourceSpec(name="arxiv", type="latex", paths=[str(tmp_path / "*.tar.gz")]))
    (doc,) = docs
    assert "\\section{Method}" in doc.text and "Details." in doc.text and "\\mathbb{R}" in doc.text
    assert stats["skipped:corrupt_tarball"] == 1


def test_jsonl_gz_and_parquet_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": f"document number {i}", "url": f"http://x/{i}"} for i in range(5)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    for kind, name in (("jsonl", "a.jsonl.gz"), ("parquet", "b.parquet")):
        docs, _ = read_all(SourceSpec(name=kind, type=kind, paths=[str(tmp_path / name)], text_field="body"))
        assert [d.text for d in docs] == [r["body"] for r in rows]
        assert docs[2].meta["url"] == "http://x/2"
    data = (tmp_path / "a.jsonl.gz").read_bytes()
    (tmp_path / "trunc.jsonl.gz").write_bytes(data[:-12])
    docs, stats = read_all(
        SourceSpec(name="j", type="jsonl", paths=[str(tmp_path / "trunc.jsonl.gz")], text_field="body")
    )
    assert stats["skipped:corrupt_gzip"] == 1 and len(docs) <= 5


def test_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[w\].paths: '.*nope\*.warc' matches no files"):
        work_units(SourceSpec(name="w", type="warc", paths=[str(tmp_path / "nope*.warc")]))


GOOD = " ".join(ARTICLE)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("too short to be a page", "too_few_words"),
        (" ".join(["a"] * 80), "mean_word_length_low"),
        (" ".join(["incomprehensibilities"] * 80), "mean_word_length_high"),
        (GOOD + " #tag" * 40, "symbol_word_ratio"),
        (" ".join(["1234 5678 90"] * 30), "few_alphabetic_words"),
        ("\n".join(f"• item number {i} in a long list of things" for i in range(30)), "bullet_lines"),
        (
            "\n".join(
                f"and then the story goes on and on through the night without stopping {i}..." for i in range(30)
            ),
            "ellipsis_lines",
        ),
        ("\n".join([ARTICLE[0]] * 6 + ARTICLE), "duplicate_lines"),
    ],
)
def test_web_filters_each_reason(text, reason):
    assert web_quality(GOOD, WebFilters()) is None
    assert web_quality(text, WebFilters()) == reason


def test_web_filter_ngram_repetition_and_thresholds_are_configurable():
    spam = GOOD + " " + " ".join(["buy cheap watches online now"] * 20)
    assert web_quality(spam, WebFilters(max_duplicate_lines=None, max_duplicate_line_chars=None)) == "top_3gram_chars"
    off = WebFilters(**{k: None for k in WebFilters.__dataclass_fields__})
    assert web_quality(spam, off) is None and web_quality("tiny", off) is None


def test_cleaning_modes():
    from llmforge.data.clean import clean_text

    raw = "caf\u0065\u0301  <b>bold</b> &amp; more\u200b\r\n\r\n\r\n\r\n    indented line   \n\x07end"
    web = clean_text(raw, "web")
    assert web == "café bold & more\n\nindented line\nend"
    plain = clean_text(raw, "plain")
    assert "    indented line" in plain and "\n\n\n" not in plain and "\u200b" not in plain and "\x07" not in plain
    assert plain.startswith("café  <b>bold</b> &amp;")  # no markup handling outside web text
    code = clean_text("def f():\r\n    return 1   \n\n\n\n", "code")
    assert code == "def f():\n    return 1\n"
