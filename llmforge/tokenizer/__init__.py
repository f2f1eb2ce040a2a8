"""Tokenizers behind one small protocol: build from a recipe, save, load, fingerprint."""

from __future__ import annotations

import json
import os

from llmforge.config.recipe import TokenizerConfig
from llmforge.errors import RecipeError
from llmforge.tokenizer.base import Tokenizer, fingerprint
from llmforge.tokenizer.char import CharTokenizer

__all__ = ["Tokenizer", "CharTokenizer", "fingerprint", "load_tokenizer", "tokenizer_from_json", "save_tokenizer"]


def tokenizer_from_json(data: dict) -> Tokenizer:
    kind = data.get("type")
    if kind == "char":
        return CharTokenizer.from_json(data)
    raise ValueError(f"unknown tokenizer type {kind!r}")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tok.to_json(), f, ensure_ascii=False)
    os.replace(tmp, path)


def load_tokenizer(cfg: TokenizerConfig, origin: str) -> Tokenizer:
    """Load the tokenizer a recipe names; a missing or unreadable file is a recipe error."""
    if not cfg.path:
        raise RecipeError(origin, "tokenizer.path", "is required (run launch/train_tokenizer.py to create it)")
    if not os.path.isfile(cfg.path):
        raise RecipeError(origin, "tokenizer.path", f"file not found: {cfg.path} "
                                                    f"(run launch/train_tokenizer.py --recipe {origin})")
    try:
        with open(cfg.path, encoding="utf-8") as f:
            data = json.load(f)
        tok = tokenizer_from_json(data)
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise RecipeError(origin, "tokenizer.path", f"{cfg.path} is not a llmforge tokenizer file ({e})") from None
    if data.get("type") != cfg.type:
        raise RecipeError(origin, "tokenizer.type", f"{cfg.type!r} but {cfg.path} holds a {data.get('type')!r} tokenizer")
    return tok
