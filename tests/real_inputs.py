"""Real inputs nobody here wrote, found on the machine at test time (never committed, never downloaded): files
shipped in installed wheels (torch/DeepSpeed C++ and CUDA headers, pyarrow's CMake files, matplotlib's PNGs), the
interpreter's own Makefile and sources, binaries from /usr/bin, Debian's python3.11-doc HTML pages (packed into a
WARC here) and cxref-doc's LaTeX example (packed into an arXiv-style tarball here). A Debian package a test needs is
installed by .ci/run; elsewhere the test is skipped with the package's name (and fails in CI, where a skip would
hide a missing input)."""

from __future__ import annotations

import glob
import io
import os
import shutil
import sysconfig
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

SITE = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PYTHON_DOC = Path("/usr/share/doc/python3.11/html")
CXREF_EXAMPLES = Path("/usr/share/doc/cxref/examples")


class MissingInput(RuntimeError):
    pass


def require(path: Path, package: str) -> Path:
    """`path` from a Debian package; under pytest a skip (a failure in CI) when it is missing."""
    if path.exists():
        return path
    message = f"needs Debian's {package} ({path} is missing): apt-get install {package}"
    try:
        import pytest
    except ImportError:
        raise MissingInput(message) from None
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError  # unreachable


def installed(pattern: str, n: Optional[int] = None) -> list[Path]:
    """Files under site-packages matching a glob (sorted), at least one."""
    found = sorted(Path(p) for p in glob.glob(str(SITE / pattern), recursive=True))
    assert found, f"no installed file matches {pattern}"
    return found[:n] if n else found


def copy_as(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def python_doc_pages(n: int, offset: int = 0) -> list[Path]:
    """n library reference pages of the Python documentation (Sphinx pages: navigation, sidebar, related links and
    footer around the article), larger ones first in name order."""
    root = require(PYTHON_DOC, "python3.11-doc")
    pages = [p for p in sorted((root / "library").glob("*.html")) if p.stat().st_size > 20_000]
    return pages[offset : offset + n]


def page_url(page: Path) -> str:
    if page.is_relative_to(PYTHON_DOC):
        return "https://docs.python.org/3.11/" + str(page.relative_to(PYTHON_DOC))
    return "https://docs.example" + str(page.resolve())  # an http(s) URI: warcio parses the HTTP headers


def write_warc(path: Path, pages: Iterable[Path], resource: bool = False) -> Path:
    """Pack HTML files into a gzipped WARC as HTTP `response` records (or `resource` records, as some crawlers and
    archivers write local files), with the headers Common Crawl writes."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for page in pages:
            body = page.read_bytes()
            if resource:
                record = writer.create_warc_record(
                    page_url(page), "resource", payload=io.BytesIO(body), warc_content_type="text/html"
                )
            else:
                http = StatusAndHeaders(
                    "200 OK",
                    [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))],
                    protocol="HTTP/1.1",
                )
                record = writer.create_warc_record(
                    page_url(page), "response", payload=io.BytesIO(body), http_headers=http
                )
                record.rec_headers.add_header("WARC-Identified-Payload-Type", "text/html")
            writer.write_record(record)
    return path


def cxref_tarball(path: Path, extra: Optional[dict[str, bytes]] = None, prefix: str = "") -> Path:
    """cxref's LaTeX example (the main file `cxref.tex` \\input-ing 26 generated chapters, with its .sty files) as
    an arXiv-style source tarball, plus `extra` members."""
    root = require(CXREF_EXAMPLES, "cxref-doc")
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(root.iterdir()):
            if f.suffix in (".tex", ".sty"):
                tar.add(f, arcname=prefix + f.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
