"""Shared fixtures: a small real corpus (stdlib sources) and a prepared dataset (helpers: tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.config import load_recipe
from llmforge.data.prepare import prepare, train_tokenizer
from llmforge.demo.stdlib_corpus import build_stdlib_corpus
from tests.helpers import write_recipe


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A data dir with corpus/ (real stdlib text), a trained char tokenizer and the prepared dataset
    prepared/stdlib/."""
    root = tmp_path_factory.mktemp("data")
    build_stdlib_corpus(str(root / "corpus"), max_bytes=400_000, max_file_bytes=20_000)
    recipe_path = write_recipe(root / "recipe.yaml", root, root / "runs")
    recipe = load_recipe(str(recipe_path))
    train_tokenizer(recipe, str(recipe_path))
    prepare(recipe, str(recipe_path), progress=False)
    return root
