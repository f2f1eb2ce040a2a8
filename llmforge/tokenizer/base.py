"""The tokenizer protocol every kind implements, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> dict:
        """Everything needed to rebuild the tokenizer; the fingerprint is a hash of it."""
        ...


def fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: shards and checkpoints record it, training compares it."""
    blob = json.dumps(tok.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
