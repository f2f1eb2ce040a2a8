"""The demo corpus: Python standard-library sources of the running interpreter — real text on every machine."""

from __future__ import annotations

import os
import sysconfig
from typing import Optional

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo", "ensurepip"}


def build_stdlib_corpus(
    out_dir: str, max_bytes: int = 8_000_000, max_file_bytes: Optional[int] = None
) -> tuple[int, int]:
    """Copy stdlib *.py files (sorted, skipping tests and files over max_file_bytes) into out_dir until max_bytes;
    returns (files, bytes)."""
    root = sysconfig.get_paths()["stdlib"]
    os.makedirs(out_dir, exist_ok=True)
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            size = len(text.encode("utf-8"))
            if max_file_bytes is not None and size > max_file_bytes:
                continue
            if total + size > max_bytes:
                return files, total
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "__")
            with open(os.path.join(out_dir, rel + ".txt"), "w", encoding="utf-8") as f:
                f.write(text)
            files += 1
            total += size
    return files, total
