"""Post-training data: JSONL conversations rendered with the chat template into token ids and a loss mask.

Template (role markers are added special tokens, see llmforge.tokenizer.added):

    <|system|>{system}<|end|><|user|>{prompt}<|end|><|assistant|>{response}<|end|>

Only assistant content and its closing <|end|> carry loss (the model learns to stop there); every other target is
-100. Examples are padded, not packed: one conversation per row, padded to the longest row of the micro-batch, so no
attention crosses conversations without a block-diagonal mask. Sample i of a split is example perm_e(i mod N) of epoch
e = i // N (a seeded per-epoch permutation), so the data position is one counter, as in pre-training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from llmforge.data.loader import FeistelPermutation
from llmforge.errors import DataError
from llmforge.model.gpt import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[j]: token j is a target (assistant content or its <|end|>)


def render(tok: Any, messages: list[dict], add_generation_prompt: bool = False) -> Example:
    """Token ids and loss mask of a conversation; with add_generation_prompt, ends with an open assistant turn."""
    end = tok.token_id("<|end|>")
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        body = tok.base.encode(m["content"]) + [end]
        ids.append(tok.token_id(f"<|{m['role']}|>"))
        mask.append(False)
        ids.extend(body)
        mask.extend([m["role"] == "assistant"] * len(body))
    if add_generation_prompt:
        ids.append(tok.token_id("<|assistant|>"))
        mask.append(False)
    return Example(ids, mask)


def _messages(rec: Any, where: str) -> list[dict]:
    """The conversation of an SFT record: {prompt, response} or {messages: [...]}."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt, response = rec.get("prompt"), rec.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: needs string fields 'prompt' and 'response', or 'messages'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _prompt_messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def read_jsonl(path: str) -> list[tuple[str, Any]]:
    """(where, record) for every non-blank line; a malformed line is a one-line DataError naming file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def split_records(
    train_file: str, val_file: Optional[str], val_fraction: float
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Train and val records: val_file, or a content-hash split of train_file."""
    records = read_jsonl(train_file)
    if val_file:
        return records, read_jsonl(val_file)
    train: list[tuple[str, Any]] = []
    val: list[tuple[str, Any]] = []
    for where, rec in records:
        h = int.from_bytes(hashlib.sha1(json.dumps(rec, sort_keys=True).encode()).digest()[:8], "big")
        (val if h / 2**64 < val_fraction else train).append((where, rec))
    if not train:
        raise DataError(f"{train_file}: posttrain.val_fraction={val_fraction} left no training examples")
    return train, val


class _Indexed:
    """Sample i -> example perm_epoch(i mod N); fingerprint of the token content."""

    def __init__(self, n: int, seed: int, digest: str):
        self.num_samples, self.seed = n, seed
        self.fingerprint = digest
        self._perms: dict[int, FeistelPermutation] = {}

    def example_index(self, i: int) -> int:
        epoch = i // self.num_samples
        if epoch not in self._perms:
            self._perms = {epoch: FeistelPermutation(self.num_samples, self.seed * 1_000_003 + epoch)}
        return self._perms[epoch](i % self.num_samples)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _shifted(ex: Example, seq_len: int) -> tuple[list[int], list[int]]:
    ids, mask = ex.ids[: seq_len + 1], ex.mask[: seq_len + 1]
    targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], targets


class SFTData(_Indexed):
    """(inputs, targets) batches of rendered conversations; prompt and padding targets are -100."""

    def __init__(self, records: list[tuple[str, Any]], tok: Any, seq_len: int, seed: int, split: str = "train"):
        self.tok, self.seq_len, self.split = tok, seq_len, split
        self.examples = [render(tok, _messages(rec, where)) for where, rec in records]
        cut = sum(len(e.ids) > seq_len + 1 for e in self.examples)
        if cut:
            logging.getLogger("llmforge").warning(
                "%d of %d %s conversations are longer than data.seq_len=%d and are cut",
                cut,
                len(self.examples),
                split,
                seq_len,
            )
        usable = [e for e in self.examples if any(e.mask[1 : seq_len + 1])]
        if records and not usable:
            raise DataError(f"{records[0][0].rsplit(':', 1)[0]}: every response starts beyond data.seq_len={seq_len}")
        self.examples = usable
        digest = hashlib.sha256(json.dumps([[e.ids, e.mask] for e in self.examples]).encode()).hexdigest()[:16]
        super().__init__(len(self.examples), seed, digest)

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, row lengths before padding)."""
        pairs = [_shifted(self.examples[self.example_index(i)], self.seq_len) for i in indices]
        return (
            _pad([p[0] for p in pairs], self.tok.pad_id),
            _pad([p[1] for p in pairs], IGNORE_INDEX),
            torch.tensor([len(p[0]) for p in pairs]),
        )

    @staticmethod
    def tokens(batch: tuple[torch.Tensor, ...]) -> int:
        """Non-pad input tokens of a batch."""
        return int(batch[2].sum())


class PreferenceData(_Indexed):
    """DPO pairs: batch() gives chosen and rejected (inputs, targets) rows (prompt and padding targets -100) and the
    example indices, which key the cached reference log-probabilities."""

    def __init__(self, records: list[tuple[str, Any]], tok: Any, seq_len: int, seed: int, split: str = "train"):
        self.tok, self.seq_len, self.split = tok, seq_len, split
        self.pairs: list[tuple[Example, Example]] = []
        for where, rec in records:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            prompt = _prompt_messages(rec.get("prompt"), where)
            chosen, rejected = rec.get("chosen"), rec.get("rejected")
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise DataError(f"{where}: needs string fields 'chosen' and 'rejected'")
            self.pairs.append(
                tuple(
                    render(tok, prompt + [{"role": "assistant", "content": c}])  # type: ignore
                    for c in (chosen, rejected)
                )
            )
        digest = hashlib.sha256(json.dumps([[p.ids for p in pair] for pair in self.pairs]).encode()).hexdigest()[:16]
        super().__init__(len(self.pairs), seed, digest)

    def rows(self, examples: list[int]) -> dict[str, Any]:
        chosen = [_shifted(self.pairs[k][0], self.seq_len) for k in examples]
        rejected = [_shifted(self.pairs[k][1], self.seq_len) for k in examples]
        both = chosen + rejected  # one forward over chosen and rejected rows together
        return {
            "inputs": _pad([p[0] for p in both], self.tok.pad_id),
            "targets": _pad([p[1] for p in both], IGNORE_INDEX),
            "lengths": torch.tensor([len(p[0]) for p in both]),
            "examples": torch.tensor(examples, dtype=torch.long),
            "split": self.split,
        }

    @staticmethod
    def tokens(batch: dict) -> int:
        """Non-pad input tokens of a batch (chosen and rejected rows)."""
        return int(batch["lengths"].sum())

    def batch(self, indices: range) -> dict[str, Any]:
        return self.rows([self.example_index(i) for i in indices])
