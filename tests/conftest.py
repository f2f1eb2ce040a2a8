"""Shared fixtures: a small real corpus (stdlib sources), a prepared dataset and recipe files in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, data_dir: Path, run_dir: Path, **sections) -> Path:
    """A tiny recipe (fast on CPU) pointing at data_dir; keyword sections are merged over the defaults."""
    recipe = {
        "run": {"name": "t", "output_dir": str(run_dir), "seed": 7},
        "data": {
            "sources": [{"name": "stdlib", "type": "text", "paths": [str(data_dir / "corpus" / "*.txt")]}],
            "prepared_dir": str(data_dir / "prepared"),
            "seq_len": 64,
            "val_fraction": 0.1,
        },
        "tokenizer": {"type": "char", "path": str(data_dir / "prepared" / "tokenizer.json")},
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "train": {
            "max_steps": 12,
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "precision": "bf16",
        },
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero2.json")},
        "checkpoint": {"interval": 4, "keep_last": 5},
        "eval": {"interval": 6, "batches": 2},
        "logging": {"interval": 1, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A data dir with corpus/ (real stdlib text), a trained char tokenizer and the prepared dataset
    prepared/stdlib/."""
    from llmforge.config import load_recipe
    from llmforge.data.prepare import prepare, train_tokenizer
    from llmforge.demo.stdlib_corpus import build_stdlib_corpus

    root = tmp_path_factory.mktemp("data")
    build_stdlib_corpus(str(root / "corpus"), max_bytes=400_000, max_file_bytes=20_000)
    recipe_path = write_recipe(root / "recipe.yaml", root, root / "runs")
    recipe = load_recipe(str(recipe_path))
    train_tokenizer(recipe, str(recipe_path))
    prepare(recipe, str(recipe_path), progress=False)
    return root


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command (a launch script via this interpreter, or a console tool from the venv) and capture output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
