"""Tokenizers behind one small protocol: char, sentencepiece BPE, local Hugging Face; load, train, fingerprint."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from llmforge.config.recipe import TokenizerConfig
from llmforge.errors import RecipeError
from llmforge.tokenizer.added import AddedTokensTokenizer
from llmforge.tokenizer.base import Tokenizer, fingerprint
from llmforge.tokenizer.char import CharTokenizer
from llmforge.tokenizer.hf import HFTokenizer
from llmforge.tokenizer.sentencepiece import SentencePieceTokenizer

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "fingerprint",
    "load_tokenizer",
    "tokenizer_from_json",
    "save_tokenizer",
    "train_tokenizer_from_texts",
    "encode_batch",
]


def tokenizer_from_json(data: dict) -> Tokenizer:
    kind = data.get("type")
    if kind == "char":
        return CharTokenizer.from_json(data)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_json(data)
    if kind == "hf":
        return HFTokenizer.from_json(data)
    if kind == "added":
        return AddedTokensTokenizer(tokenizer_from_json(data["base"]), data["tokens"])
    raise ValueError(f"unknown tokenizer type {kind!r}")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tok.to_json(), f, ensure_ascii=False)
    os.replace(tmp, path)


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tok, "encode_batch", None)
    return batch(texts) if batch else [tok.encode(t) for t in texts]


def train_tokenizer_from_texts(cfg: TokenizerConfig, texts: Iterable[str], origin: str) -> Tokenizer:
    """Train the recipe's tokenizer kind on `texts` and save it to cfg.path."""
    if not cfg.path:
        raise RecipeError(origin, "tokenizer.path", "is required: where to write the trained tokenizer")
    if cfg.type == "char":
        tok = CharTokenizer.train(texts, cfg.vocab_size)
        save_tokenizer(tok, cfg.path)
        return tok
    if cfg.type == "sentencepiece":
        if cfg.vocab_size is None:
            raise RecipeError(origin, "tokenizer.vocab_size", "is required to train a sentencepiece tokenizer")
        try:
            return SentencePieceTokenizer.train(texts, cfg.vocab_size, cfg.path, cfg.byte_fallback)
        except RuntimeError as e:  # sentencepiece reports bad settings (vocab too small for the alphabet) this way
            raise RecipeError(origin, "tokenizer.vocab_size", str(e).split("]")[-1].strip()) from None
    raise RecipeError(origin, "tokenizer.type", "hf tokenizers are used as they are, not trained here")


def load_tokenizer(cfg: TokenizerConfig, origin: str) -> Tokenizer:
    """Load the tokenizer a recipe names; a missing or unreadable file is a recipe error."""
    if not cfg.path:
        raise RecipeError(origin, "tokenizer.path", "is required (run launch/train_tokenizer.py to create it)")
    exists = os.path.isdir(cfg.path) if cfg.type == "hf" else os.path.isfile(cfg.path)
    if not exists:
        hint = "" if cfg.type == "hf" else f" (run launch/train_tokenizer.py --recipe {origin})"
        raise RecipeError(origin, "tokenizer.path", f"not found: {cfg.path}{hint}")
    try:
        if cfg.type == "sentencepiece":
            return SentencePieceTokenizer.load(cfg.path)
        if cfg.type == "hf":
            return HFTokenizer.load(cfg.path)
        with open(cfg.path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("type") != "char":
            raise RecipeError(origin, "tokenizer.type", f"'char' but {cfg.path} holds a {data.get('type')!r} tokenizer")
        return CharTokenizer.from_json(data)
    except RecipeError:
        raise
    except Exception as e:  # a corrupt file: sentencepiece, tokenizers and json each raise their own types
        raise RecipeError(origin, "tokenizer.path", f"{cfg.path} is not a {cfg.type} tokenizer ({e})") from None
