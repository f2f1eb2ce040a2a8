"""Synthetic but realistic web pages for benchmarks: real English paragraphs (docstrings of the local Python
standard library) inside varied page templates with navigation, cookie banners, sidebars, comments and footers."""

from __future__ import annotations

import ast
import io
import os
import random
import sysconfig

BOILERPLATE = ["Accept all cookies", "Subscribe to our newsletter", "All rights reserved", "Privacy policy",
               "Terms of use", "Related articles", "Share on social media", "Sign in to comment", "Advertisement"]


def paragraphs(limit: int = 4000) -> list[str]:
    """Docstring paragraphs of at least 25 words from the stdlib."""
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node)
                    for para in (doc or "").split("\n\n"):
                        text = " ".join(para.split())
                        if len(text.split()) >= 25 and text[0].isupper() and "<" not in text and ">" not in text:
                            out.append(text)
                            if len(out) >= limit:
                                return out
    return out


def page(rng: random.Random, paras: list[str]) -> tuple[str, list[str]]:
    """(html, main paragraphs) of one page."""
    chosen = rng.sample(paras, rng.randint(3, 8))
    title = " ".join(chosen[0].split()[:6])
    nav = " | ".join(f'<a href="/{w.lower()}">{w}</a>' for w in rng.sample(
        ["Home", "News", "Sport", "Business", "Culture", "Science", "Travel", "Opinion", "Contact"], 6))
    side = "".join(f"<li><a href='/r{i}'>{' '.join(rng.choice(paras).split()[:7])}</a></li>" for i in range(5))
    comments = "".join(f"<div class='comment'><b>user{i}</b> {BOILERPLATE[7]}</div>" for i in range(rng.randint(0, 3)))
    body = "".join(f"<p>{p}</p>" for p in chosen)
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<script>window.dataLayer=[];function t(){{return 1}}</script><style>body{{font:14px sans-serif}}</style></head><body>
<header><div class="logo">The Daily Page</div><nav>{nav}</nav></header>
<div id="cookie-banner">We use cookies. {BOILERPLATE[0]} or manage preferences.</div>
<div class="ad">{BOILERPLATE[8]}</div>
<main><article><h1>{title}</h1><p class="byline">By Staff Writer, {rng.randint(1, 28)} May 2024</p>{body}
<div class="share">{BOILERPLATE[6]}</div></article>{comments}</main>
<aside><h3>{BOILERPLATE[5]}</h3><ul>{side}</ul><div class="newsletter">{BOILERPLATE[1]}</div></aside>
<footer><p>© 2024 The Daily Page. {BOILERPLATE[2]}.</p><a href="/privacy">{BOILERPLATE[3]}</a>
<a href="/terms">{BOILERPLATE[4]}</a></footer></body></html>"""
    return html, chosen


def write_warc(path: str, n_pages: int, seed: int = 0) -> int:
    """A gzipped WARC of n_pages HTML responses; returns its size in bytes."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng, paras = random.Random(seed), paragraphs()
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for i in range(n_pages):
            html, _ = page(rng, paras)
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(f"https://site{i % 97}.example/{seed}/{i}", "response",
                                                          payload=io.BytesIO(html.encode()), http_headers=headers))
    return os.path.getsize(path)
