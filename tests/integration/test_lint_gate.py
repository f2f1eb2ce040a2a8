"""The lint gate reads every source file of the package: an exclude written for the repository's run and data
directories must not also match a package directory of the same name (`llmforge/data/` was skipped that way)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_ruff_reads_every_python_file_of_the_package():
    shown = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--show-files", "."], cwd=REPO, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    read = {Path(line.strip()).resolve() for line in shown.stdout.splitlines() if line.strip().endswith(".py")}
    package = {p.resolve() for p in (REPO / "llmforge").rglob("*.py")}
    assert package, "no package sources found"
    missing = sorted(str(p.relative_to(REPO)) for p in package - read)
    assert not missing, f"ruff skips {len(missing)} package files, e.g. {missing[:3]}"
    assert any("llmforge/data/" in str(p) for p in read)
