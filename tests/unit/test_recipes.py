"""Recipes: every shipped recipe loads; extends/--set; each bad-input class ends in one line and exit code 2."""

import glob
import json
import os

import pytest
import yaml

from llmforge.config import load_recipe
from llmforge.config.deepspeed import compose_ds_config
from llmforge.errors import RecipeError
from tests.conftest import REPO, run_cli, write_recipe


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True)))
def test_every_shipped_recipe_loads_and_composes(path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(os.path.relpath(path, REPO))
    ds = compose_ds_config(recipe, 2, "runs/x", path, on_cpu=True)
    assert ds["train_batch_size"] == recipe.train.micro_batch_size * recipe.train.grad_accum_steps * 2


def test_extends_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {d_model: 64, n_heads: 4}\ntrain: {lr: 1.0e-3, max_steps: 100, warmup_steps: 10}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {max_steps: 50}\n")
    r = load_recipe(str(child), ["train.lr=3e-4", "model.activation_checkpointing.mode=selective"])
    assert (r.model.d_model, r.train.max_steps, r.train.lr) == (64, 50, 3e-4)
    assert r.model.activation_checkpointing.mode == "selective"
    assert r.model.n_heads == 4 and r.train.warmup_steps == 10 and r.train.min_lr == 1e-4  # parent + defaults


BAD = [
    # (recipe edits, extra CLI args, expected key, expected fragment)
    ({"train": {"lr": -1.0}}, [], "train.lr", "must be > 0"),
    ({"train": {"lrr": 1.0}}, [], "train.lrr", "did you mean 'lr'"),
    ({"modle": {}}, [], "modle", "did you mean 'model'"),
    ({"train": {"max_steps": "ten"}}, [], "train.max_steps", "must be an integer"),
    ({"model": {"d_model": 30, "n_heads": 4}}, [], "model.d_model", "not divisible by n_heads"),
    ({"model": {"n_heads": 4, "n_kv_heads": 3}}, [], "model.n_kv_heads", "not divisible"),
    ({"model": {"mlp": "relu"}}, [], "model.mlp", "must be one of swiglu | gelu"),
    ({"deepspeed": {"config": "ds_configs/nope.json"}}, [], "deepspeed.config", "file not found"),
    ({"tokenizer": {"path": "/nonexistent/tok.json"}}, [], "tokenizer.path", "not found: /nonexistent"),
    ({"deepspeed": {"overrides": {"train_batch_size": 7}}}, [], "deepspeed.overrides", "train_batch_size=7"),
    ({}, ["--set", "train.nope=1"], "train.nope", "unknown key"),
    ({}, ["--set", "train.lr"], "--set", "expected KEY=VALUE"),
    ({"train": {"warmup_steps": 50, "max_steps": 10}}, [], "train.warmup_steps", "exceeds"),
    ({"model": {"vocab_size": 10}}, [], "model.vocab_size", "below the tokenizer's"),
]


@pytest.mark.parametrize("edits,args,key,fragment", BAD, ids=[b[2] + ":" + b[3][:12] for b in BAD])
def test_bad_recipe_one_line_exit_2_nothing_written(tmp_path, prepared, edits, args, key, fragment):
    path = write_recipe(tmp_path / "bad.yaml", prepared, tmp_path / "runs", **edits)
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"recipe error: {path}: {key}: "), lines[0]
    assert fragment in lines[0]
    assert not (tmp_path / "runs").exists()


def test_compile_without_a_compiler_is_one_line(tmp_path, prepared):
    """train.compile on a CPU machine where Inductor finds no C++ compiler: refused before anything is written."""
    path = write_recipe(tmp_path / "c.yaml", prepared, tmp_path / "runs", train={"compile": True})
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), env={"CXX": "no-such-c++-compiler"})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"recipe error: {path}: train.compile: torch.compile on CPU needs a C++ compiler (g++, clang++ "
        "or the one $CXX names); none was found; or set train.compile: false"
    )
    assert not (tmp_path / "runs").exists()


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\ntrain: {lr: 1e-3\n  max_steps: 3\n")
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"recipe error: {path}: line ") and "YAML syntax error" in line


def test_missing_recipe_and_extends(tmp_path):
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "file not found" in result.stderr and len(result.stderr.splitlines()) == 1
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\n")
    with pytest.raises(RecipeError, match="extends: file not found: parent.yaml"):
        load_recipe(str(child))


def test_composed_ds_config_derives_only_what_must_agree(tmp_path, prepared):
    path = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"micro_batch_size": 3, "grad_accum_steps": 5, "grad_clip": 0.5, "precision": "fp32"},
        deepspeed={
            "config": str(REPO / "ds_configs/zero3.json"),
            "overrides": {"zero_optimization": {"overlap_comm": True}},
        },
    )
    recipe = load_recipe(str(path))
    ds = compose_ds_config(recipe, 4, str(tmp_path / "run"), str(path), on_cpu=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        3,
        5,
        60,
    )
    assert ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True
    with open(REPO / "ds_configs/zero3.json") as f:  # everything else stays DeepSpeed's own JSON
        plain = json.load(f)["zero_optimization"]
    assert {k: v for k, v in ds["zero_optimization"].items() if k != "overlap_comm"} == {
        k: v for k, v in plain.items() if k != "overlap_comm"
    }
    assert ds["optimizer"]["params"]["lr"] == recipe.train.lr
    # on CPU torch's AdamW with its fused kernel; on GPU DeepSpeed's own FusedAdam (nothing added)
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    on_gpu = compose_ds_config(recipe, 4, str(tmp_path / "run"), str(path), on_cpu=False)["optimizer"]["params"]
    assert "torch_adam" not in on_gpu and "fused" not in on_gpu
    # DeepSpeed's own throughput timer (a device synchronisation at every forward and step) is off, as DeepSpeed
    # reads it; a recipe can turn it back on
    from deepspeed.utils.config import get_timers_config

    assert get_timers_config({}).enabled and not get_timers_config(ds).enabled
    with_timer = load_recipe(str(path), ["deepspeed.overrides.timers.throughput.enabled=true"])
    assert get_timers_config(compose_ds_config(with_timer, 4, str(tmp_path / "run"), str(path), True)).enabled


def test_resolved_recipe_and_ds_config_saved(tmp_path, prepared):
    """The run directory records exactly what ran (checked on a 1-process run of 2 steps)."""
    path = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 2, "warmup_steps": 1},
        eval={"interval": 0},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
        logging={"interval": 1, "tensorboard": True},
    )
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), "--set", "train.lr=2e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["lr"] == 2e-3 and resolved["model"]["vocab_size"] > 0
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["optimizer"]["params"]["lr"] == 2e-3
    assert ds["timers"] == {"throughput": {"enabled": False}}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "eta_s"):
        assert key in train_rows[0]
    assert train_rows[0]["mfu"] is None  # no peak FLOPs on CPU
    assert train_rows[1]["tokens"] == 2 * 4 * 64
    summary = run_cli("llmforge", "summary", "--run", str(run))
    assert summary.returncode == 0 and "steps 2 | val loss first n/a" in summary.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)


def test_readme_lists_every_recipe_key():
    from llmforge.config.reference import recipe_keys

    readme = (REPO / "README.md").read_text()
    missing = [key for key, _, _ in recipe_keys() if f"`{key}`" not in readme]
    assert not missing, f"README recipe tables lack {missing}; regenerate with python -m llmforge.config.reference"


def test_unnamed_sources_are_named_after_their_type(tmp_path):
    """The first recipe a user writes names no source: each gets its type as name, made unique."""
    path = tmp_path / "r.yaml"
    path.write_text(
        "data:\n  sources:\n"
        "    - {type: text, paths: [corpus.txt]}\n"
        "    - {type: text, paths: [more.txt]}\n"
        "    - {name: text-2, type: text, paths: [named.txt]}\n"
        "    - {type: code, paths: [src]}\n"
    )
    names = [s.name for s in load_recipe(str(path)).data.sources]
    assert names == ["text", "text-3", "text-2", "code"]
