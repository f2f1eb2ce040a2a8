"""Where a benchmark's table goes: --out, else bench/results/<name>."""

from __future__ import annotations

import os
from typing import Optional


def write_result(text: str, out: Optional[str], name: str) -> str:
    path = out or os.path.join("bench", "results", name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
