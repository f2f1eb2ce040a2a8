"""A local Hugging Face tokenizer directory (tokenizer.json, read with the `tokenizers` library)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from tokenizers import Tokenizer


class HFTokenizer:
    def __init__(self, tokenizer_json: str, eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        self._json, self._eos, self._pad = tokenizer_json, eos_token, pad_token
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos_id = self.tok.token_to_id(eos_token) if eos_token else None
        if eos_id is None:
            raise ValueError(f"the tokenizer has no end-of-sequence token {eos_token!r}")
        self.eos_id = eos_id
        pad_id = self.tok.token_to_id(pad_token) if pad_token else None
        self.pad_id = eos_id if pad_id is None else pad_id

    @classmethod
    def load(cls, directory: str) -> HFTokenizer:
        with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer_json = f.read()
        eos = pad = None
        config = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                cfg = json.load(f)
            eos, pad = _token(cfg.get("eos_token")), _token(cfg.get("pad_token"))
        return cls(tokenizer_json, eos, pad)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def to_json(self) -> dict:
        return {"type": "hf", "tokenizer_json": self._json, "eos_token": self._eos, "pad_token": self._pad}

    @classmethod
    def from_json(cls, data: dict) -> HFTokenizer:
        return cls(data["tokenizer_json"], data.get("eos_token"), data.get("pad_token"))


def _token(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value
