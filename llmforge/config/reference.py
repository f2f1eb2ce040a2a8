"""Every recipe key with its default and docstring, for the README tables and their test."""

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


if __name__ == "__main__":
    print(markdown_tables())
