"""A tokenizer plus added special tokens (the chat role markers), with ids after the base vocabulary.

Text is split on the added tokens first and the pieces between them go through the base tokenizer, the way Hugging
Face tokenizers treat added tokens, so the exported tokenizer agrees. Training code inserts the ids directly, so a
role marker typed inside a message stays plain text there.
"""

from __future__ import annotations

import re
from typing import Any

CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class AddedTokensTokenizer:
    def __init__(self, base: Any, tokens: list[str]):
        if not tokens or len(set(tokens)) != len(tokens):
            raise ValueError(f"added tokens must be distinct and non-empty, got {tokens}")
        self.base, self.tokens = base, list(tokens)
        self.base_size = base.vocab_size
        self.vocab_size = base.vocab_size + len(tokens)
        self.eos_id, self.pad_id = base.eos_id, base.pad_id
        self.bos_id = getattr(base, "bos_id", -1)
        self._ids = {t: self.base_size + i for i, t in enumerate(tokens)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")

    def token_id(self, token: str) -> int:
        return self._ids[token]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._ids:
                ids.append(self._ids[part])
            elif part:
                ids.extend(self.base.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i >= self.base_size:
                out.append(self.base.decode(run))
                run = []
                out.append(self.tokens[i - self.base_size])
            else:
                run.append(i)
        out.append(self.base.decode(run))
        return "".join(out)

    def to_json(self) -> dict:
        return {"type": "added", "base": self.base.to_json(), "tokens": self.tokens}


def with_chat_tokens(tok: Any) -> AddedTokensTokenizer:
    """`tok` with the chat role markers; a tokenizer that already has them is returned as it is."""
    if isinstance(tok, AddedTokensTokenizer) and all(t in tok.tokens for t in CHAT_TOKENS):
        return tok
    return AddedTokensTokenizer(tok, CHAT_TOKENS)
