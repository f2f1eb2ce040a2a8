"""Every recipe key with its default and docstring: docs/recipes.md is generated from here
(`python -m llmforge.config.reference > docs/recipes.md`) and a test keeps it in sync."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from llmforge.config.recipe import Recipe


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def recipe_keys(cls: Any = Recipe, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every leaf field; list-of-dataclass fields appear as `key[].field`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from recipe_keys(tp, f"{prefix}{f.name}.")
            continue
        yield f"{prefix}{f.name}", _default(f), f.metadata.get("doc", "")
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            yield from recipe_keys(args[0], f"{prefix}{f.name}[].")


def markdown_tables() -> str:
    """One table per top-level section."""
    out, section = [], None
    for key, default, text in recipe_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            out += ["", f"**{top}**", "", "| key | default | meaning |", "|---|---|---|"]
        if isinstance(default, bool):
            shown = str(default).lower()
        elif default is None:
            shown = "null"
        else:
            shown = default
        out.append(f"| `{key}` | `{shown}` | {text.replace('|', '/')} |")
    return "\n".join(out).strip() + "\n"


INTRO = """# Recipe reference

A recipe is YAML read with `yaml.safe_load` into one typed dataclass per section. `extends: base.yaml` merges the
recipe over a parent (resolved next to the recipe, then from the working directory); `--set KEY=VALUE` overrides any
key (the value is parsed as YAML). Unknown keys (with the nearest valid key suggested), wrong types, out-of-range
values, inconsistent model dimensions, missing files, YAML syntax errors (with the line) and batch sizes that disagree
with the DeepSpeed JSON are refused in one line, exit code 2, before anything is written.

This file is generated from the dataclass docstrings: `python -m llmforge.config.reference > docs/recipes.md`
(tests/unit/test_recipes.py fails when it is out of date).
"""

DEEPSPEED = """## The DeepSpeed config

The composed config (saved as `ds_config.json` in the run directory) is the JSON named by `deepspeed.config` plus
`deepspeed.overrides`, with only what must agree with the recipe derived: `train_micro_batch_size_per_gpu`,
`gradient_accumulation_steps`, `train_batch_size = micro x accum x data-parallel ranks`, `gradient_clipping`,
`bf16`/`fp16`, the AdamW hyper-parameters and the TensorBoard monitor path. An explicit, conflicting value in the JSON
or overrides is an error. The LR schedule is computed by llmforge, so a DeepSpeed `scheduler` section is refused.
DeepSpeed's throughput timer, which synchronises the device at every forward and every `engine.step()`, is off unless
the JSON or overrides turn it on (`timers.throughput.enabled`): llmforge measures tokens/s itself.
"""


def recipes_markdown() -> str:
    """docs/recipes.md: the introduction, one table per recipe section, how the DeepSpeed config is composed."""
    tables = "\n".join(
        f"## {line[2:-2]}" if line.startswith("**") and line.endswith("**") else line
        for line in markdown_tables().split("\n")
    )
    return f"{INTRO}\n{tables}\n{DEEPSPEED}"


if __name__ == "__main__":
    print(recipes_markdown(), end="")
