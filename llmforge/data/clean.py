"""Text normalisation applied to every document before filtering: Unicode NFC, line endings, control and invisible
characters everywhere; trailing spaces and runs of blank lines in plain text and code (indentation is kept); and for
text extracted from web pages also leftover tags and entities and all runs of spaces."""

from __future__ import annotations

import html
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]")
_TAGS = re.compile(
    r"</?(?:p|div|span|br|a|b|i|em|strong|li|ul|ol|td|tr|table|h[1-6]|img|font|script|style)"
    r"\b[^<>]{0,500}>",
    re.I,
)
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str, mode: str = "plain") -> str:
    """mode: "web" (extracted page text), "plain" (text, LaTeX, JSONL/Parquet records) or "code"."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if mode != "web":
        text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
        return text + "\n" if mode == "code" and text else _BLANKS.sub("\n\n", text)
    if "<" in text and ">" in text:
        text = _TAGS.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def normalized_for_hash(text: str) -> str:
    """Lower-cased, punctuation-free, whitespace-collapsed form used for exact dedup."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())
