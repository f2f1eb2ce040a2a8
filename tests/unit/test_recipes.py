"""Recipes: every shipped recipe loads; extends/--set; each bad-input class ends in one line and exit code 2."""

import glob
import json
import os

import pytest

from llmforge.config import load_recipe
from llmforge.config.deepspeed import compose_ds_config
from llmforge.config.reference import recipe_keys, recipes_markdown
from tests.helpers import REPO, write_recipe


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True)))
def test_every_shipped_recipe_loads_and_composes(path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(os.path.relpath(path, REPO))
    ds = compose_ds_config(recipe, 2, "runs/x", path, on_cpu=True)
    t = recipe.train
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        t.micro_batch_size,
        t.grad_accum_steps,
    )
    if recipe.parallel.model_parallel == 1:  # else DeepSpeed derives it (see compose_ds_config)
        assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum_steps * 2


def test_extends_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {d_model: 64, n_heads: 4}\ntrain: {lr: 1.0e-3, max_steps: 100, warmup_steps: 10}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {max_steps: 50}\n")
    r = load_recipe(str(child), ["train.lr=3e-4", "model.activation_checkpointing.mode=selective"])
    assert (r.model.d_model, r.train.max_steps, r.train.lr) == (64, 50, 3e-4)
    assert r.model.activation_checkpointing.mode == "selective"
    assert r.model.n_heads == 4 and r.train.warmup_steps == 10 and r.train.min_lr == 1e-4  # parent + defaults


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


def test_the_recipe_reference_is_generated_and_complete():
    """docs/recipes.md is exactly what the dataclass docstrings generate, and it names every key."""
    doc = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert doc == recipes_markdown(), "docs/recipes.md is stale: python -m llmforge.config.reference > docs/recipes.md"
    missing = [key for key, _, _ in recipe_keys() if f"`{key}`" not in doc]
    assert not missing and len(list(recipe_keys())) > 100


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


def test_paths_are_relative_to_the_recipe_that_declares_them(tmp_path, monkeypatch):
    from llmforge.config.loader import PACKAGE_DIR

    (tmp_path / "base").mkdir()
    (tmp_path / "proj").mkdir()
    (tmp_path / "base" / "ds.json").write_text("{}")
    (tmp_path / "base" / "parent.yaml").write_text(
        "deepspeed: {config: ds.json}\ndata: {prepared_dir: shared/data}\ntrain: {init_from: ../weights}\n"
    )
    (tmp_path / "proj" / "my.yaml").write_text(
        "extends: ../base/parent.yaml\nrun: {output_dir: runs}\n"
        "data: {sources: [{type: text, paths: [raw/*.txt, /abs/x.txt]}], datasets: [{path: ready}]}\n"
        "tokenizer: {path: '~/tok.json'}\n"
    )
    monkeypatch.chdir(tmp_path / "base")  # anywhere but the recipe's directory
    r = load_recipe("../proj/my.yaml", ["data.prepared_dir=here"])
    assert r.deepspeed.config == str(tmp_path / "base" / "ds.json")  # the parent's key, against the parent's dir
    assert r.train.init_from == str(tmp_path / "weights")
    assert r.run.output_dir == str(tmp_path / "proj" / "runs")
    assert r.data.sources[0].paths == [str(tmp_path / "proj" / "raw" / "*.txt"), "/abs/x.txt"]
    assert r.data.datasets[0].path == str(tmp_path / "proj" / "ready")
    assert r.tokenizer.path == os.path.expanduser("~/tok.json")
    assert r.data.prepared_dir == "here"  # --set: the shell's working directory, as a command-line path is
    # a recipe shipped with llmforge: its DeepSpeed config is the shipped file, its data and run paths the project's
    (tmp_path / "proj" / "demo.yaml").write_text("extends: llmforge:tiny-char.yaml\n")
    shipped = load_recipe(str(tmp_path / "proj" / "demo.yaml"))
    assert shipped.deepspeed.config == os.path.join(PACKAGE_DIR, "ds_configs", "zero2.json")
    assert os.path.isfile(shipped.deepspeed.config)
    assert (shipped.data.prepared_dir, shipped.run.output_dir) == ("data/tiny-char", "runs")
    assert load_recipe(
        str(tmp_path / "proj" / "demo.yaml"), ["deepspeed.config=llmforge:zero3.json"]
    ).deepspeed.config == (os.path.join(PACKAGE_DIR, "ds_configs", "zero3.json"))


def test_an_error_names_the_file_that_declared_the_key(tmp_path):
    from llmforge.config.deepspeed import compose_ds_config
    from llmforge.errors import RecipeError

    (tmp_path / "base").mkdir()
    parent = tmp_path / "base" / "parent.yaml"
    parent.write_text("deepspeed: {config: missing.json}\ntrain: {lr: -1.0}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base/parent.yaml\ntrain: {max_steps: 500}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(child))
    assert str(e.value) == f"{parent}: train.lr: must be > 0, got -1.0"
    recipe = load_recipe(str(child), ["train.lr=1e-3"])
    with pytest.raises(RecipeError) as e:
        compose_ds_config(recipe, 1, str(tmp_path / "run"), str(child), True)
    assert str(e.value) == f"{parent}: deepspeed.config: file not found: {tmp_path / 'base' / 'missing.json'}"
    with pytest.raises(RecipeError) as e:
        load_recipe(str(child), ["train.max_steps=-2"])
    assert str(e.value) == "--set: train.max_steps: must be > 0, got -2"
    with pytest.raises(RecipeError) as e:
        load_recipe(str(child), ["train.nope=1"])
    assert str(e.value).startswith("--set: train.nope: unknown key")
    (tmp_path / "lost.yaml").write_text("extends: recipes/llama-125m.yaml\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(tmp_path / "lost.yaml"))
    assert str(e.value) == (
        f"{tmp_path / 'lost.yaml'}: extends: file not found: {tmp_path / 'recipes' / 'llama-125m.yaml'} (a recipe "
        "shipped with llmforge: extends: llmforge:NAME)"
    )
