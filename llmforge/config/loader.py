"""Recipe loading: YAML (safe_load) → `extends:` merge → `--set` dotted overrides → typed, validated `Recipe`."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from llmforge.config.recipe import ConfigError, Recipe
from llmforge.errors import DECLARED, RecipeError


def _read_yaml(path: str, origin: str) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(origin, "extends" if origin != path else "", f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}" if mark else ""
        raise RecipeError(path, where, f"YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RecipeError(path, "", f"YAML error: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(path, "", f"top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """A copy of `base` with `over` merged in: nested mappings merge, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = "llmforge:"  # `llmforge:llama-125m.yaml`, `llmforge:zero1.json`: a recipe or DeepSpeed config shipped here
SHIPPED_DIRS = (os.path.join(PACKAGE_DIR, "recipes"), os.path.join(PACKAGE_DIR, "ds_configs"))

# Keys whose values are paths (a string or a list of them); `[]` marks a list of sections.
PATH_KEYS = (
    "run.output_dir",
    "tokenizer.path",
    "data.prepared_dir",
    "data.sources[].paths",
    "data.datasets[].path",
    "data.decontaminate.paths",
    "deepspeed.config",
    "train.init_from",
    "checkpoint.dir",
    "posttrain.train_file",
    "posttrain.val_file",
)


def shipped_path(ref: str) -> str:
    """`llmforge:NAME` → the file shipped in the package (recipes/ or ds_configs/); any other path unchanged."""
    if not ref.startswith(SHIPPED):
        return ref
    name = ref[len(SHIPPED) :]
    found = [os.path.join(d, name) for d in SHIPPED_DIRS if os.path.isfile(os.path.join(d, name))]
    return found[0] if found else os.path.join(SHIPPED_DIRS[name.endswith(".json")], name)


def is_shipped(path: str) -> bool:
    """A recipe shipped with llmforge: a template whose data, tokenizer and run paths are the user's project's, so
    they stay relative to the working directory."""
    return os.path.realpath(path).startswith(os.path.realpath(PACKAGE_DIR) + os.sep)


def _resolve(value: Any, base: Optional[str]) -> Any:
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(SHIPPED):
        return shipped_path(value)
    value = os.path.expanduser(value)
    return value if base is None or os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def resolve_paths(data: dict, base: Optional[str]) -> None:
    """In place: every path key's relative value joined to `base` (None: left relative to the working directory);
    `llmforge:NAME` made the shipped file's path."""
    for key in PATH_KEYS:
        _map_path(data, key.split("."), base)


def _map_path(node: Any, parts: list[str], base: Optional[str]) -> None:
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    if head.endswith("[]"):
        for item in node.get(head[:-2]) or []:
            _map_path(item, rest, base)
    elif not rest:
        if head in node:
            node[head] = _resolve(node[head], base)
    else:
        _map_path(node.get(head), rest, base)


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _leaf_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _load_with_extends(path: str, origins: dict[str, str], seen: tuple[str, ...] = ()) -> dict:
    """The recipe at `path` merged over its `extends` chain, each file's relative paths resolved against its own
    directory (a shipped recipe's against the working directory); `origins` gets the file that declared each key."""
    real = os.path.realpath(path)
    if real in seen:
        raise RecipeError(path, "extends", "circular extends chain")
    data = _read_yaml(path, path)
    declared = [k for k in _leaf_keys(data) if k != "extends"]
    parent = data.pop("extends", None)
    resolve_paths(data, None if is_shipped(path) else os.path.dirname(os.path.abspath(path)))
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(path, "extends", f"must be a file path, got {parent!r}")
        found = _resolve(parent, os.path.dirname(os.path.abspath(path)))
        if not os.path.isfile(found):
            hint = "" if parent.startswith(SHIPPED) else " (a recipe shipped with llmforge: extends: llmforge:NAME)"
            raise RecipeError(path, "extends", f"file not found: {found}{hint}")
        data = deep_merge(_load_with_extends(found, origins, seen + (real,)), data)
    origins.update(dict.fromkeys(declared, path))
    return data


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(choices)})"


def _schema_of(tp: Any) -> Any:
    """The dataclass a (possibly Optional) annotation refers to, or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the raw recipe dict, checking the key exists."""
    if "=" not in assignment:
        raise ConfigError("--set", f"expected KEY=VALUE, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    schema: Any = Recipe
    node = data
    for i, part in enumerate(parts):
        key_so_far = ".".join(parts[: i + 1])
        if schema is not None:
            fields = {f.name: f for f in dataclasses.fields(schema)}
            if part not in fields:
                raise ConfigError(key_so_far, "unknown key" + _suggest(part, list(fields)))
            hint = typing.get_type_hints(schema)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
        schema = _schema_of(hint) if schema is not None else None
        if schema is None and not _is_dict(hint):
            raise ConfigError(key_so_far, "is not a section; cannot set a key below it")


def _is_dict(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key)
        problems = []
        for alternative in inner:  # e.g. Union[Literal["all"], list[str]]: the first that takes the value
            try:
                return _convert(value, alternative, key)
            except ConfigError as e:
                problems.append(e.problem.split(", got ")[0].removeprefix("must be "))
        raise ConfigError(key, f"must be {' or '.join(problems)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {' | '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp} at {key}")


def from_dict(cls: Any, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types with the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<top>", f"must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(prefix + str(key), "unknown key" + _suggest(str(key), list(fields)))
        kwargs[key] = _convert(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(prefix + e.key, e.problem) from None


def load_recipe(path: str, overrides: Optional[list[str]] = None) -> Recipe:
    """Load, merge, override and validate a recipe. Every problem raises `RecipeError` naming the key and the file
    that declared it (`--set` for an override). A relative path is relative to the recipe file that declared it
    (to the working directory in `--set` and in recipes shipped with llmforge); `llmforge:NAME` names a shipped
    recipe or DeepSpeed config."""
    origins: dict[str, str] = {}
    DECLARED.pop(path, None)
    data = _load_with_extends(path, origins)
    for assignment in overrides or []:
        try:
            apply_override(data, assignment)
        except ConfigError as e:
            raise RecipeError("--set", "" if e.key == "--set" else e.key, e.problem) from None
        origins[assignment.split("=", 1)[0].strip()] = "--set"
    resolve_paths(data, None)  # --set values: `llmforge:` names only
    DECLARED[path] = origins
    try:
        recipe = from_dict(Recipe, data)
    except ConfigError as e:
        raise RecipeError(path, e.key, e.problem) from None
    recipe.deepspeed.config = shipped_path(recipe.deepspeed.config)  # the default names a shipped config
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def recipe_from_dict(data: dict, origin: str = "<checkpoint>") -> Recipe:
    try:
        return from_dict(Recipe, data)
    except ConfigError as e:
        raise RecipeError(origin, e.key, e.problem) from None
