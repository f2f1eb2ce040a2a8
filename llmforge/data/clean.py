"""Text normalisation applied to every document before filtering: Unicode NFC, control characters, leftover
markup, whitespace. Code keeps its indentation and line structure."""

from __future__ import annotations

import html
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff]")
_TAGS = re.compile(r"</?(?:p|div|span|br|a|b|i|em|strong|li|ul|ol|td|tr|table|h[1-6]|img|font|script|style)"
                   r"\b[^<>]{0,500}>", re.I)
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str, code: bool = False) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if code:
        return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"
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
