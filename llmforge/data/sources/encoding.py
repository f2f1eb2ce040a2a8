"""Bytes → text for every reader: binary content is recognised and refused, declared encodings are honoured, and
what is neither UTF-8 nor declared goes to a detector (charset-normalizer).

Order, first match wins:
1. a byte-order mark (UTF-8, UTF-16, UTF-32);
2. strict UTF-8 (nearly every file, and the fast path);
3. an encoding the file declares: PEP 263 / Emacs / Vim coding lines in its first two lines (`# -*- coding: latin-1
   -*-`, `vim: set fileencoding=cp1252`), LaTeX `\\usepackage[latin1]{inputenc}`, XML `<?xml ... encoding="...">`
   and HTML `<meta charset=...>` near the top;
4. UTF-8 with U+FFFD for the bad bytes when valid multi-byte UTF-8 characters are at least as many (a file mixing
   encodings);
5. charset-normalizer's best guess;
6. UTF-8 with U+FFFD for what stays undecodable.
Every lossy decode is counted (`repaired:invalid-utf-8`, `repaired:undecodable`, `repaired:replacement_chars`).
"""

from __future__ import annotations

import codecs
import re
from typing import Optional

from charset_normalizer import from_bytes

from llmforge.data.sources.base import Stats, count

# File signatures of formats that are never text (the first bytes of the file).
MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"\x7fELF": "elf",
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"%PDF-": "pdf",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xca\xfe\xba\xbe": "mach-o",
    b"\xcf\xfa\xed\xfe": "mach-o",
    b"MZ": "pe",
    b"\x00asm": "wasm",
    b"RIFF": "riff",
    b"OggS": "ogg",
    b"ID3": "mp3",
    b"fLaC": "flac",
    b"\x00\x00\x01\x00": "ico",
    b"wOFF": "woff",
    b"wOF2": "woff2",
    b"SQLite format 3\x00": "sqlite",
    b"\x93NUMPY": "npy",
    b"!<arch>\n": "ar",
}
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_CODING_LINE = re.compile(rb"^[ \t\f]*(?:#|//|/\*|--|;|%|<!--).*?coding[:=][ \t]*([-\w.]+)", re.M)
_INPUTENC = re.compile(rb"\\usepackage\[([-\w.]+)\]\{inputenc\}")
_XML_DECL = re.compile(rb"<\?xml[^>]{0,200}?encoding=[\"']([-\w.]+)[\"']")
_META_CHARSET = re.compile(rb"<meta[^>]{0,200}?charset=[\"']?([-\w.]+)", re.I)
# LaTeX inputenc option names that Python's codec registry does not know under that name.
_ALIASES = {
    "latin9": "iso8859-15",
    "ansinew": "cp1252",
    "applemac": "mac-roman",
    "utf8x": "utf-8",
    "decmulti": "latin-1",
    "next": "latin-1",
}
SNIFF_BYTES = 8192
MAX_REPLACEMENT_FRACTION = 0.01  # more U+FFFD than this in decoded text: not text


def binary_kind(data: bytes) -> Optional[str]:
    """The format of content that is not text (by signature, or 'nul' for NUL bytes near the top), else None."""
    head = data[:SNIFF_BYTES]
    for magic, kind in MAGIC.items():
        if data.startswith(magic):
            if magic.isascii() and b"\x00" not in head and _utf8_text(head):
                continue  # "MZ", "ID3", "BZh", "RIFF", "%PDF-" ... can also start a line of text
            return kind
    if b"\x00" in head and not head.startswith(tuple(b for b, _ in _BOMS)):
        return "nul"
    return None


def _utf8_text(head: bytes) -> bool:
    """Valid UTF-8 (a multi-byte character cut at the end of the sample allowed)."""
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"


def declared_encoding(data: bytes) -> Optional[str]:
    """The codec name a file declares for itself, if Python knows it."""
    head = data[:SNIFF_BYTES]
    first_two = b"\n".join(head.split(b"\n", 2)[:2])
    for pattern, where in ((_CODING_LINE, first_two), (_INPUTENC, head), (_XML_DECL, head), (_META_CHARSET, head)):
        m = pattern.search(where)
        if m:
            name = m.group(1).decode("ascii", "replace").lower()
            name = _ALIASES.get(name, name)
            try:
                return codecs.lookup(name).name
            except LookupError:
                return None
    return None


def _decode(data: bytes) -> tuple[str, Optional[str]]:
    """(text, codec) where codec is None for UTF-8, "undecodable" for the lossy fallback."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(name), None
            except UnicodeDecodeError:
                break
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    declared = declared_encoding(data)
    if declared is not None and declared != "utf-8":
        try:
            return data.decode(declared), declared
        except UnicodeDecodeError:
            pass
    lossy = data.decode("utf-8", errors="replace")
    bad = lossy.count("\ufffd")
    if sum(ord(c) > 127 for c in lossy) - bad >= bad:
        return lossy, "invalid-utf-8"  # UTF-8 with a few bad bytes (a mixed file), not a legacy encoding
    best = from_bytes(data[: 1 << 20]).best()
    if best is not None and best.encoding:
        try:
            return data.decode(best.encoding), codecs.lookup(best.encoding).name
        except (UnicodeDecodeError, LookupError):
            pass
    return lossy, "undecodable"


def _count_decode(stats: Stats, text: str, codec: Optional[str]) -> None:
    if codec in ("undecodable", "invalid-utf-8"):
        count(stats, f"repaired:{codec}")
        count(stats, "repaired:replacement_chars", text.count("\ufffd"))
    elif codec is not None:
        count(stats, f"decoded:{codec}")


def decode(data: bytes, stats: Stats) -> str:
    """Text of a file's bytes (see the module docstring). A non-UTF-8 decode is counted as `decoded:<codec>`, bytes
    nothing decodes as `repaired:undecodable` (and `repaired:replacement_chars`)."""
    text, codec = _decode(data)
    _count_decode(stats, text, codec)
    return text


def read_text_file(data: bytes, stats: Stats) -> Optional[str]:
    """Decoded text, or None (counted as `skipped:binary` and `skipped:binary:<kind>`) for content that is not
    text: a known binary signature, NUL bytes near the top, or more than 1% U+FFFD after every decoder."""
    kind = binary_kind(data)
    if kind is None:
        text, codec = _decode(data)
        if codec != "undecodable" or text.count("\ufffd") <= MAX_REPLACEMENT_FRACTION * len(text):
            _count_decode(stats, text, codec)
            return text
        kind = "undecodable"
    count(stats, "skipped:binary")
    count(stats, f"skipped:binary:{kind}")
    return None
