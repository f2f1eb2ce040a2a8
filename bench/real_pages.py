"""Real web pages with known main text and known boilerplate, in page kinds and languages:
- the Python documentation (Debian's python3.11-doc): Sphinx pages with a mobile menu, a sidebar (table of
  contents, previous/next topic, "This Page", "Report a Bug", "Show Source", quick search), navigation bars above
  and below, and a licence footer;
- the Node.js API documentation (Debian's nodejs, /usr/share/doc/nodejs/api): a left column listing every module,
  a header with version picker, "Index", "View on single page", "View as JSON", "Edit on GitHub" and a table of
  contents;
- Debian's FAQ in 9 languages (debian-faq, debian-faq-{de,fr,it,ja,nl,pt,ru,zh-cn}): DocBook chapters between a
  navigation header and footer;
- `--sdists DIR` (bench/html_extraction.py): real pages saved with their expected output in two content-extraction
  libraries' source distributions (fetched from the package registry with `pip download`): trafilatura 1.1.0's
  tests/cache (83 pages of news sites, blogs, shops, associations, public bodies; mostly German, also English and
  French), each with the main-text snippets its tests require and the boilerplate snippets they forbid
  (tests/realworld_tests.py); newspaper4k 0.9.6's news articles (tests/data/html) in 8 languages with the article
  text expected (tests/data/txt).

For the documentation pages the page's own structure tells which text is which: the main text is the `<p>`
paragraphs of the main block, split into sentences; the boilerplate is every link, heading, paragraph and text line
of the navigation, sidebar, header and footer blocks that does not also occur in the main block (a table of
contents repeats the section headings, which are main text). For the news articles the main text is the expected
text's sentences and the boilerplate every link, list item and heading of the page not in it. A sentence counts
when it has 6 words or more (20 characters or more in scripts without spaces).
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])|(?<=[。！？])")
_CJK = re.compile(r"[\u0e00-\u0eff\u1000-\u109f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
# family: (root, Debian package, main block, boilerplate blocks)
FAMILIES = {
    "python-docs": (
        "/usr/share/doc/python3.11/html",
        "python3.11-doc",
        "//div[@role='main']",
        (
            "//div[contains(@class,'sphinxsidebar')]",
            "//div[contains(@class,'related')]",
            "//div[contains(@class,'footer')]",
            "//div[contains(@class,'mobile-nav')]",
        ),
    ),
    "nodejs-docs": (
        "/usr/share/doc/nodejs/api",
        "nodejs",
        "//div[@id='apicontent']",
        ("//div[@id='column2']", "//header"),
    ),
    "debian-faq": (
        "/usr/share/doc/debian/FAQ",
        "debian-faq debian-faq-de debian-faq-fr debian-faq-it debian-faq-ja debian-faq-nl debian-faq-pt "
        "debian-faq-ru debian-faq-zh-cn",
        "//div[@class='chapter']",
        ("//div[@class='navheader']", "//div[@class='navfooter']"),
    ),
}
SDISTS = {"trafilatura": "trafilatura==1.1.0", "newspaper4k": "newspaper4k==0.9.6"}


def norm(text: str) -> str:
    return " ".join(text.split())


def long_enough(sentence: str) -> bool:
    """6 words or more; 20 characters or more where words are not separated by spaces."""
    return len(sentence.split()) >= 6 or len(_CJK.findall(sentence)) >= 20


def sentences_of(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(norm(text)) if long_enough(s)]


@dataclass
class Page:
    path: str
    html: bytes
    sentences: list[str]  # main-text sentences (or snippets)
    boilerplate: list[str]  # snippets that are not main text
    family: str = ""
    lang: str = ""  # language of the main text (lid.176)


def pages(limit: int = 0, min_sentences: int = 5, families: tuple[str, ...] = tuple(FAMILIES)) -> list[Page]:
    """Pages with at least `min_sentences` main-text sentences, in path order, up to `limit` per family."""
    out = []
    for family in families:
        root, package, main_xpath, boiler_xpaths = FAMILIES[family]
        if not os.path.isdir(root):
            print(f"real_pages: {family} skipped, {root} is missing (apt-get install {package})", file=sys.stderr)
            continue
        n = 0
        found = sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True))
        if family == "debian-faq":  # each chapter in every language before the next: a limit takes all languages
            found.sort(key=os.path.basename)
        for path in found:
            rel = path[len(root) :]
            if (
                "/_" in rel
                or rel.endswith(("genindex.html", "search.html", "/all.html", "/index.html"))
                or "genindex-" in rel
                or "py-modindex" in rel
                or (family == "debian-faq" and rel.count(".") < 2)
            ):
                continue
            with open(path, "rb") as f:
                page = _page(path, f.read(), main_xpath, boiler_xpaths, min_sentences)
            if page is not None:
                page.family = family
                out.append(page)
                n += 1
            if limit and n >= limit:
                break
    if not out:
        raise SystemExit("real_pages: no pages found (apt-get install python3.11-doc)")
    return out


def _page(
    path: str, html: bytes, main_xpath: str, boiler_xpaths: tuple[str, ...], min_sentences: int
) -> Optional[Page]:
    import lxml.html

    tree = lxml.html.fromstring(html)
    main = tree.xpath(main_xpath)
    if not main:
        return None
    main_text = norm(main[0].text_content())
    sentences = [s for p in main[0].iter("p") for s in sentences_of(p.text_content())]
    boiler = set()
    for xp in boiler_xpaths:
        for block in tree.xpath(xp):
            texts = [el.text_content() for el in block.iter("a", "h1", "h2", "h3", "h4", "p", "summary", "option")]
            texts += [t for t in block.itertext()]  # bare text lines (a footer's licence lines)
            for t in map(norm, texts):
                if (len(t.split()) >= 2 or len(_CJK.findall(t)) >= 4) and t not in main_text and len(t) < 200:
                    boiler.add(t)
    if len(sentences) < min_sentences or not boiler:
        return None
    return Page(path, html, sentences, sorted(boiler))


def score(text: str, page: Page) -> tuple[float, float]:
    """(main-text sentence recall, boilerplate snippets leaked) of one extracted text."""
    flat = norm(text)
    recall = sum(s in flat for s in page.sentences) / len(page.sentences)
    # nan: a page whose tests forbid no snippet (averages skip it)
    leaked = sum(b in flat for b in page.boilerplate) / len(page.boilerplate) if page.boilerplate else float("nan")
    return recall, leaked


def fetch_sdists(directory: str) -> dict[str, str]:
    """{library: path of its unpacked source distribution} under `directory`, fetched with `pip download` (from the
    package registry) the first time."""
    import subprocess
    import tarfile

    out = {}
    for lib, requirement in SDISTS.items():
        name, version = requirement.split("==")
        unpacked = os.path.join(directory, f"{name}-{version}")
        if not os.path.isdir(unpacked):
            os.makedirs(directory, exist_ok=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", requirement,
                 "-d", directory],
                check=True,
            )  # fmt: skip
            with tarfile.open(os.path.join(directory, f"{name}-{version}.tar.gz")) as tar:
                tar.extractall(directory, filter="data")
        out[lib] = unpacked
    return out


def trafilatura_pages(root: str) -> list[Page]:
    """trafilatura's real-world test pages: for each `result = load_mock_page(url)` in tests/realworld_tests.py's
    test_extract, the snippets its asserts require (`'...' in result`) and forbid (`'...' not in result`)."""
    import ast

    tests = os.path.join(root, "tests")
    with open(os.path.join(tests, "realworld_tests.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())

    def in_order(node: ast.AST) -> Iterator[ast.AST]:  # source order (ast.walk is breadth-first)
        yield node
        for child in ast.iter_child_nodes(node):
            yield from in_order(child)

    files = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MOCK_PAGES":
            files = ast.literal_eval(node.value)
    want: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    extract = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "test_extract")
    for node in in_order(extract):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "load_mock_page":
            current = ast.literal_eval(node.args[0])
            want.setdefault(current, ([], []))
        elif isinstance(node, ast.Compare) and current and isinstance(node.left, ast.Constant):
            if getattr(node.comparators[0], "id", "") != "result" or not isinstance(node.left.value, str):
                continue
            (want[current][0] if isinstance(node.ops[0], ast.In) else want[current][1]).append(node.left.value)
    out = []
    for url, (main, boiler) in want.items():
        path = os.path.join(tests, "cache", files[url])
        if main and os.path.isfile(path):
            with open(path, "rb") as f:
                out.append(Page(path, f.read(), [norm(x) for x in main], [norm(x) for x in boiler], "web-pages"))
    return out


def newspaper_pages(root: str) -> list[Page]:
    """newspaper4k's test articles: the expected text's sentences are the main text; every link, list item and
    heading of the page not in that text is boilerplate."""
    import lxml.html

    out = []
    data = os.path.join(root, "tests", "data")
    for path in sorted(glob.glob(os.path.join(data, "html", "*.html"))):
        expected = os.path.join(data, "txt", os.path.basename(path)[:-5] + ".txt")
        if not os.path.isfile(expected):
            continue
        with open(expected, encoding="utf-8") as f:
            text = f.read()
        main = [s for line in text.split("\n") for s in sentences_of(line)]
        with open(path, "rb") as f:
            html = f.read()
        flat = norm(text)
        tree = lxml.html.fromstring(html)
        boiler = set()
        for el in tree.iter("a", "li", "h1", "h2", "h3", "h4", "option", "button", "label"):
            t = norm(el.text_content())
            if (len(t.split()) >= 2 or len(_CJK.findall(t)) >= 4) and len(t) < 200 and t not in flat:
                boiler.add(t)
        if len(main) >= 3 and boiler:
            out.append(Page(path, html, main, sorted(boiler), "news-articles"))
    return out


def sdist_pages(directory: str) -> list[Page]:
    roots = fetch_sdists(directory)
    return trafilatura_pages(roots["trafilatura"]) + newspaper_pages(roots["newspaper4k"])
