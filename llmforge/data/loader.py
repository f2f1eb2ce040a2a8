"""Training samples: fixed-length token windows from prepared datasets, blended by weight in a seeded global order.

Global sample g maps to (dataset, window) in O(1) time and O(1) memory: a short periodic blend pattern picks the
dataset, and a keyed Feistel permutation (cycle-walking) picks the window of the current epoch — no per-sample array
exists, so a rank's memory does not grow with the corpus. Each optimizer step consumes `global_batch` consecutive
global indices, sliced by data-parallel rank without overlap: the position is one counter (`consumed_samples`).
Shards are opened lazily from the sizes in the manifest, so a dataset of 10,000 shard files opens without reading
any index file.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from typing import Optional

import numpy as np
import torch

from llmforge.config.data import DatasetSpec
from llmforge.data.indexed import IndexedDataset
from llmforge.data.merge import read_manifest
from llmforge.data.stages import StagePlan
from llmforge.data.verify import check_shard_files, out_of_vocabulary
from llmforge.errors import CorruptSampleError, DataError

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded bijection of range(n) evaluated per index: 4-round Feistel network on the next even power of two,
    cycle-walking back into range. O(1) memory whatever n is."""

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half, self.mask = bits // 2, (1 << (bits // 2)) - 1
        self.keys = [_mix64((key * 4 + r) & _MASK64) for r in range(4)]

    def __call__(self, i: int) -> int:
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class TokenWindows:
    """Sample i of a split is seq_len+1 tokens of one shard's concatenated (EOS-separated) documents."""

    def __init__(
        self, directory: str, shards: list[dict], seq_len: int, dtype: np.dtype, vocab_size: Optional[int] = None
    ):
        self.directory, self.seq_len, self.dtype = directory, seq_len, np.dtype(dtype)
        self.vocab_size = vocab_size
        self.problem: Optional[str] = None  # the first token id outside the vocabulary read, as a one-line message
        self.prefixes = [s["prefix"] for s in shards]
        per_shard = np.array([max(0, (s["tokens"] - 1) // seq_len) for s in shards], dtype=np.int64)
        self.cumulative = np.cumsum(per_shard)
        self.num_samples = int(self.cumulative[-1]) if len(per_shard) else 0
        self._open: dict[int, np.memmap] = {}

    def _tokens(self, shard: int) -> np.memmap:
        if shard not in self._open:
            if len(self._open) >= 64:  # bound open files on datasets with thousands of shards
                self._open.pop(next(iter(self._open)))
            path = os.path.join(self.directory, self.prefixes[shard] + ".bin")
            self._open[shard] = np.memmap(path, mode="r", dtype=self.dtype)
        return self._open[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.cumulative, i, side="right"))
        local = i - (int(self.cumulative[shard - 1]) if shard else 0)
        start = local * self.seq_len
        window = self._tokens(shard)[start : start + self.seq_len + 1]
        if len(window) != self.seq_len + 1:
            raise DataError(f"{self.directory}/{self.prefixes[shard]}.bin is shorter than its manifest says")
        if self.vocab_size is not None:
            bad = out_of_vocabulary(window, self.vocab_size)
            if len(bad):  # a corrupt shard: remembered, and the window replaced so the step can still run
                if self.problem is None:
                    self.problem = self._describe(shard, start + int(bad[0]), int(window[bad[0]]))
                return np.zeros(self.seq_len + 1, dtype=np.int64)
        return np.asarray(window, dtype=np.int64)

    def _describe(self, shard: int, position: int, token: int) -> str:
        prefix = os.path.join(self.directory, self.prefixes[shard])
        try:
            bounds = np.cumsum(IndexedDataset(prefix).lengths.astype(np.int64))
            where = f"document {int(np.searchsorted(bounds, position, side='right'))}, token {position}"
        except ValueError:
            where = f"token {position}"
        return (
            f"{prefix}.bin: token id {token} at {where} is outside the vocabulary of {self.vocab_size} (the "
            f"shard is corrupt: check it with llmforge verify-data {self.directory})"
        )


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


class _StageBlend:
    """One stage's blend: the periodic pattern over the datasets it reads, and where each dataset's windows resume
    (the windows earlier stages took of it)."""

    def __init__(self, weights: list[float], offsets: np.ndarray):
        active = [d for d, w in enumerate(weights) if w > 0]
        local = blend_pattern([weights[d] for d in active]) if len(active) > 1 else np.zeros(1, dtype=np.int64)
        self.pattern = np.asarray(active, dtype=np.int64)[local]
        n = len(weights)
        self.per_period = np.bincount(self.pattern, minlength=n)
        self.rank_in_period = np.zeros(len(self.pattern), dtype=np.int64)
        self.before = np.zeros((len(self.pattern) + 1, n), dtype=np.int64)  # row p: each dataset's count in [0, p)
        for i, d in enumerate(self.pattern):
            self.rank_in_period[i] = self.before[i, d]
            self.before[i + 1] = self.before[i]
            self.before[i + 1, d] += 1
        self.offsets = offsets

    def counts(self, n: int) -> np.ndarray:
        """Samples of each dataset among this stage's first n."""
        period, pos = divmod(n, len(self.pattern))
        return period * self.per_period + self.before[pos]


class BlendedOrder:
    """Seeded global order over several sample sets: index g → (dataset, sample), O(1) for any g.

    `stages` (first global sample, weights per dataset), in order: the blend changes at each stage's first sample,
    and each dataset's permuted windows continue where the earlier stages left them (a source read in two stages
    does not start over). None: one stage of `weights`."""

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        seed: int,
        stages: Optional[list[tuple[int, list[float]]]] = None,
    ):
        self.sizes, self.seed = sizes, seed
        stages = stages or [(0, list(weights))]
        self.firsts = [first for first, _ in stages]
        self.blends: list[_StageBlend] = []
        offsets = np.zeros(len(sizes), dtype=np.int64)
        for i, (first, w) in enumerate(stages):
            blend = _StageBlend(w, offsets.copy())
            self.blends.append(blend)
            if i + 1 < len(stages):
                offsets += blend.counts(stages[i + 1][0] - first)
        self._perm: dict[tuple[int, int], FeistelPermutation] = {}

    def permutation(self, dataset: int, epoch: int) -> FeistelPermutation:
        key = (dataset, epoch)
        if key not in self._perm:
            if len(self._perm) > 16:
                self._perm.clear()
            self._perm[key] = FeistelPermutation(
                self.sizes[dataset], _mix64(self.seed) ^ _mix64(dataset * 1_000_003 + epoch)
            )
        return self._perm[key]

    def _stage(self, g: int) -> int:
        return max(0, bisect.bisect_right(self.firsts, g) - 1)

    def locate(self, g: int) -> tuple[int, int]:
        s = self._stage(g)
        blend = self.blends[s]
        period, pos = divmod(g - self.firsts[s], len(blend.pattern))
        d = int(blend.pattern[pos])
        k = int(blend.offsets[d]) + period * int(blend.per_period[d]) + int(blend.rank_in_period[pos])
        epoch, j = divmod(k, self.sizes[d])
        return d, self.permutation(d, epoch)(j)

    def samples_by_dataset(self, consumed: int) -> list[int]:
        """How many of the first `consumed` global samples each dataset gave."""
        s = self._stage(consumed)
        blend = self.blends[s]
        return [int(x) for x in blend.offsets + blend.counts(consumed - self.firsts[s])]


def split_counts(manifest: dict, split: str) -> str:
    """What the manifest says of a split (and of the documents read and kept), for error messages."""
    sp, st = manifest["splits"][split], manifest.get("stats", {})
    return (
        f"its {split} split holds {sp['tokens']} tokens in {sp['documents']} documents, {len(sp['shards'])} "
        f"shards (manifest: read {st.get('read', 0)}, kept {st.get('kept', 0)} documents)"
    )


def micro_batch_indices(consumed: int, micro_step: int, rank: int, world: int, micro_batch: int) -> range:
    """Global sample indices of one rank's micro-batch; a step covers consumed .. consumed + micro·accum·world."""
    start = consumed + (micro_step * world + rank) * micro_batch
    return range(start, start + micro_batch)


def next_micro_batch(consumed: int, micro_step: int, accum: int, global_batch: int) -> tuple[int, int]:
    """The (consumed samples, micro step) after this one: the next micro-batch of the step, else the first of the
    next step. The trainer's read-ahead follows this order."""
    return (consumed, micro_step + 1) if micro_step + 1 < accum else (consumed + global_batch, 0)


class PretrainData:
    """The train (or val) split of the recipe's datasets, blended, as (inputs, targets) batches."""

    def __init__(
        self,
        specs: list[DatasetSpec],
        seq_len: int,
        seed: int,
        split: str = "train",
        tokenizer_fingerprint: Optional[str] = None,
        verify_mb: float = 0.0,
    ):
        """Opening checks every shard file's size and index header against the manifest (and sha256 when the
        split's files total at most `verify_mb` MB). A token id outside the vocabulary read later raises
        CorruptSampleError, or with `defer_errors` set (the trainer, which tells every rank at the step's
        all-reduce) is kept in `problem` and its window read as zeros."""
        self.defer_errors = False
        if not specs:
            raise DataError("no datasets to train on: set data.datasets, or data.sources + data.prepared_dir")
        windows: list[TokenWindows] = []
        weights: list[float] = []
        digests: list[str] = []
        self.names: list[str] = []  # of the datasets read (those with samples in this split), in order
        self.fingerprints: list[str] = []
        for spec in specs:
            try:
                manifest = read_manifest(spec.path)
            except FileNotFoundError:
                raise DataError(
                    f"{spec.path}: not a prepared dataset (no manifest.json); run launch/prepare_data.py first"
                ) from None
            have = manifest.get("tokenizer", {}).get("fingerprint")
            if tokenizer_fingerprint is not None and have != tokenizer_fingerprint:
                raise DataError(
                    f"{spec.path}: shards were tokenized with tokenizer {have}, the recipe's tokenizer is "
                    f"{tokenizer_fingerprint}; re-run launch/prepare_data.py"
                )
            shards = manifest["splits"][split]["shards"]
            check_shard_files(spec.path, manifest, split, verify_mb)
            w = TokenWindows(spec.path, shards, seq_len, manifest["dtype"], manifest["tokenizer"].get("vocab_size"))
            if w.num_samples == 0 and split == "train":
                raise DataError(
                    f"{spec.path}: no training sample: {split_counts(manifest, 'train')}, and a sample "
                    f"needs seq_len+1={seq_len + 1} tokens of one shard; add data (see the manifest's "
                    f"dropped:* counts) or lower data.seq_len"
                )
            own = [manifest["files"][f"{s['prefix']}.bin"]["sha256"] for s in manifest["splits"][split]["shards"]]
            digests.extend(own)
            if w.num_samples:
                windows.append(w)
                weights.append(spec.weight)
                self.names.append(str(spec.name))
                self.fingerprints.append(hashlib.sha256("|".join(own).encode()).hexdigest()[:16])
        self.windows, self.weights, self.seed, self.seq_len = windows, weights, seed, seq_len
        self.num_samples = sum(w.num_samples for w in windows)
        self.order = BlendedOrder([w.num_samples for w in windows], weights, seed) if windows else None
        self.fingerprint = hashlib.sha256("|".join(digests).encode()).hexdigest()[:16]
        self.plan: Optional[StagePlan] = None

    def use_stages(self, plan: StagePlan) -> None:
        """Read in `plan`'s stages: each its own blend from its first global sample (data.stages)."""
        self.plan = plan
        stages = [(s.first_sample, s.weights) for s in plan.stages]
        self.order = BlendedOrder([w.num_samples for w in self.windows], self.weights, self.seed, stages)

    def tokens_by_source(self, consumed: int) -> dict[str, int]:
        """Training tokens each dataset gave to the first `consumed` global samples."""
        assert self.order is not None
        counts = self.order.samples_by_dataset(consumed)
        return {name: n * self.seq_len for name, n in zip(self.names, counts)}

    @property
    def problem(self) -> Optional[str]:
        """The first corrupt sample read (a token id outside the vocabulary), as a one-line message."""
        return next((w.problem for w in self.windows if w.problem), None)

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for g in indices:
            d, i = self.order.locate(g)
            rows.append(self.windows[d][i])
        if not self.defer_errors and self.problem:
            raise CorruptSampleError(self.problem)
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1], block[:, 1:]

    @staticmethod
    def tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Input tokens of a batch (windows are never padded)."""
        return batch[0].numel()
