"""Training samples: fixed-length token windows from prepared datasets, blended by weight in a seeded global order.

Global sample g maps to (dataset, window) in O(1): a short periodic blend pattern picks the dataset, and a seeded
per-epoch permutation picks the window. Each optimizer step consumes `global_batch` consecutive global indices,
sliced by data-parallel rank without overlap, so the position is restored from one counter (`consumed_samples`).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np
import torch

from llmforge.config.recipe import DatasetSpec
from llmforge.data.indexed import IndexedDataset
from llmforge.data.prepare import read_manifest
from llmforge.errors import DataError


class TokenWindows:
    """Sample i is tokens[i·L : i·L + L + 1] of a split's concatenated documents (EOS-separated)."""

    def __init__(self, prefix: str, seq_len: int):
        self.tokens = IndexedDataset(prefix).tokens
        self.seq_len = seq_len
        self.num_samples = max(0, (len(self.tokens) - 1) // seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)


def blend_pattern(weights: list[float], period: int = 1000) -> np.ndarray:
    """Dataset id per position of one period, spreading each dataset evenly (largest deficit first)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.maximum(1, np.round(w * period)).astype(np.int64)
    total = int(counts.sum())
    placed = np.zeros(len(w), dtype=np.int64)
    pattern = np.empty(total, dtype=np.int64)
    for i in range(total):
        d = int(np.argmax(counts * (i + 1) / total - placed))
        pattern[i] = d
        placed[d] += 1
    return pattern


class BlendedOrder:
    """Seeded global order over several sample sets: index g → (dataset, sample), O(1) for any g."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes, self.seed = sizes, seed
        self.pattern = blend_pattern(weights) if len(sizes) > 1 else np.zeros(1, dtype=np.int64)
        self.per_period = np.bincount(self.pattern, minlength=len(sizes))
        # rank of each pattern position among earlier positions of the same dataset
        self.rank_in_period = np.zeros(len(self.pattern), dtype=np.int64)
        seen = np.zeros(len(sizes), dtype=np.int64)
        for i, d in enumerate(self.pattern):
            self.rank_in_period[i] = seen[d]
            seen[d] += 1

    @lru_cache(maxsize=8)
    def _permutation(self, dataset: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, dataset, epoch]).permutation(self.sizes[dataset])

    def locate(self, g: int) -> tuple[int, int]:
        period, pos = divmod(g, len(self.pattern))
        d = int(self.pattern[pos])
        k = period * int(self.per_period[d]) + int(self.rank_in_period[pos])
        epoch, j = divmod(k, self.sizes[d])
        return d, int(self._permutation(d, epoch)[j])


def micro_batch_indices(consumed: int, micro_step: int, rank: int, world: int, micro_batch: int) -> range:
    """Global sample indices of one rank's micro-batch; a step covers consumed .. consumed + micro·accum·world."""
    start = consumed + (micro_step * world + rank) * micro_batch
    return range(start, start + micro_batch)


class PretrainData:
    """The train (or val) split of the recipe's datasets, blended, as (inputs, targets) batches."""

    def __init__(self, specs: list[DatasetSpec], seq_len: int, seed: int, split: str = "train",
                 tokenizer_fingerprint: str | None = None):
        if not specs:
            raise DataError("data.datasets is empty and data.prepared_dir is not set: nothing to train on")
        self.windows, digests = [], []
        for spec in specs:
            try:
                manifest = read_manifest(spec.path)
            except FileNotFoundError:
                raise DataError(f"{spec.path}: not a prepared dataset (no manifest.json); "
                                f"run launch/prepare_data.py first") from None
            have = manifest.get("tokenizer", {}).get("fingerprint")
            if tokenizer_fingerprint is not None and have != tokenizer_fingerprint:
                raise DataError(f"{spec.path}: shards were tokenized with tokenizer {have}, the recipe's tokenizer is "
                                f"{tokenizer_fingerprint}; re-run launch/prepare_data.py")
            windows = TokenWindows(os.path.join(spec.path, split), seq_len)
            if windows.num_samples == 0 and split == "train":
                raise DataError(f"{spec.path}: train split has fewer than seq_len+1={seq_len + 1} tokens")
            self.windows.append(windows)
            digests.append(manifest["files"][f"{split}.bin"]["sha256"])
        usable = [(w, s.weight) for w, s in zip(self.windows, specs) if w.num_samples > 0]
        self.windows = [w for w, _ in usable]
        self.num_samples = sum(w.num_samples for w in self.windows)
        self.order = (BlendedOrder([w.num_samples for w in self.windows], [wt for _, wt in usable], seed)
                      if self.windows else None)
        self.fingerprint = hashlib.sha256("|".join(digests).encode()).hexdigest()[:16]

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for g in indices:
            d, i = self.order.locate(g)
            rows.append(self.windows[d][i])
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1], block[:, 1:]
