"""Shared pieces of the typed recipe: the field-error type, documented fields and range checks."""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad value for `key` (dotted, relative to the object that raised it)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def doc(default: Any = None, text: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a docstring kept in its metadata (for --help and docs/recipes.md)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if allow_zero and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}")
        if not allow_zero and value <= 0:
            raise ConfigError(name, f"must be > 0, got {value}")
