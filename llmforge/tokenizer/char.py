"""Character-level tokenizer: one id per character, plus <pad>, <eos>, <unk>."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Optional

SPECIALS = ["<pad>", "<eos>", "<unk>"]


class CharTokenizer:
    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}
        self.vocab_size = len(SPECIALS) + len(self.chars)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: Optional[int] = None) -> CharTokenizer:
        """Keep the most frequent characters (all of them when vocab_size is None), ordered by code point."""
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(text)
        keep = [c for c, _ in counts.most_common(None if vocab_size is None else vocab_size - len(SPECIALS))]
        return cls(sorted(keep))

    def encode(self, text: str) -> list[int]:
        ids, unk = self._ids, self.unk_id
        return [ids.get(c, unk) for c in text]

    def decode(self, ids: list[int]) -> str:
        n = len(SPECIALS)
        out = []
        for i in ids:
            if i >= n:
                out.append(self.chars[i - n])
            elif i == self.eos_id:
                out.append("\n")
            elif i == self.unk_id:
                out.append("\ufffd")
        return "".join(out)

    def to_json(self) -> dict:
        return {"type": "char", "specials": SPECIALS, "chars": self.chars}

    @classmethod
    def from_json(cls, data: dict) -> CharTokenizer:
        return cls(data["chars"])
