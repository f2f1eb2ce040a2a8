"""Real web pages with known main text and known boilerplate, from two site generators:
- the Python documentation (Debian's python3.11-doc): Sphinx pages with a mobile menu, a sidebar (table of
  contents, previous/next topic, "This Page", "Report a Bug", "Show Source", quick search), navigation bars above
  and below, and a licence footer;
- the Node.js API documentation (Debian's nodejs, /usr/share/doc/nodejs/api): a left column listing every module,
  a header with version picker, "Index", "View on single page", "View as JSON", "Edit on GitHub" and a table of
  contents.

The page's own structure tells which text is which: the main text is the `<p>` paragraphs of the main block,
split into sentences of 6 words or more; the boilerplate is every link, heading, paragraph and text line of the
navigation, sidebar, header and footer blocks (2 words or more) that does not also occur in the main block (a
table of contents repeats the section headings, which are main text).
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
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
}


def norm(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Page:
    path: str
    html: bytes
    sentences: list[str]  # main-text sentences
    boilerplate: list[str]  # snippets that are not main text


def pages(limit: int = 0, min_sentences: int = 5, families: tuple[str, ...] = tuple(FAMILIES)) -> list[Page]:
    """Pages with at least `min_sentences` main-text sentences, in path order, up to `limit` per family."""
    out = []
    for family in families:
        root, package, main_xpath, boiler_xpaths = FAMILIES[family]
        if not os.path.isdir(root):
            print(f"real_pages: {family} skipped, {root} is missing (apt-get install {package})", file=sys.stderr)
            continue
        n = 0
        for path in sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True)):
            rel = path[len(root) :]
            if (
                "/_" in rel
                or rel.endswith(("genindex.html", "search.html", "/all.html", "/index.html"))
                or "genindex-" in rel
                or "py-modindex" in rel
            ):
                continue
            with open(path, "rb") as f:
                page = _page(path, f.read(), main_xpath, boiler_xpaths, min_sentences)
            if page is not None:
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
    sentences = [s for p in main[0].iter("p") for s in _SENTENCE.split(norm(p.text_content())) if len(s.split()) >= 6]
    boiler = set()
    for xp in boiler_xpaths:
        for block in tree.xpath(xp):
            texts = [el.text_content() for el in block.iter("a", "h1", "h2", "h3", "h4", "p", "summary", "option")]
            texts += [t for t in block.itertext()]  # bare text lines (a footer's licence lines)
            for t in map(norm, texts):
                if len(t.split()) >= 2 and t not in main_text and len(t) < 200:
                    boiler.add(t)
    if len(sentences) < min_sentences or not boiler:
        return None
    return Page(path, html, sentences, sorted(boiler))


def score(text: str, page: Page) -> tuple[float, float]:
    """(main-text sentence recall, boilerplate snippets leaked) of one extracted text."""
    flat = norm(text)
    recall = sum(s in flat for s in page.sentences) / len(page.sentences)
    leaked = sum(b in flat for b in page.boilerplate) / len(page.boilerplate)
    return recall, leaked
