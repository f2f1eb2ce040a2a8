"""Merge stage: one global pass over every worker's parts of a dataset — exact dedup by hash, near-dedup by MinHash
LSH — then the kept documents are copied into the final shards and `manifest.json` is written last."""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterator
from typing import Optional

import numpy as np

from llmforge.config.data import DataConfig, SourceSpec
from llmforge.data.dedup import near_duplicates
from llmforge.data.indexed import IndexedDataset, IndexedDatasetWriter
from llmforge.data.pipeline import SPLITS, part_prefix
from llmforge.data.sources import WorkUnit, expand_paths
from llmforge.errors import DataError
from llmforge.fileio import sha256_file

DATASET_MANIFEST = "manifest.json"


def file_digest(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


class ShardWriter:
    """Writes documents into <dir>/<split>-NNNNN.{bin,idx}, starting a new shard past `shard_tokens`."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.limit = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._writer: Optional[IndexedDatasetWriter] = None
        self._tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        writer = self._writer
        if writer is None or self._tokens >= self.limit:
            self._close()
            name = f"{self.split}-{len(self.shards):05d}"
            writer = self._writer = IndexedDatasetWriter(os.path.join(self.directory, name), self.dtype)
            self.shards.append({"prefix": name, "documents": 0, "tokens": 0})
            self._tokens = 0
        writer.add_document(tokens)
        self._tokens += len(tokens)
        self.shards[-1]["documents"] += 1
        self.shards[-1]["tokens"] += len(tokens)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _load_parts(dataset_dir: str, units: list[WorkUnit]) -> list[tuple[str, dict, dict]]:
    parts, missing = [], []
    for unit in units:  # input order: the first occurrence of a duplicate is the one kept
        prefix = part_prefix(dataset_dir, unit)
        if not os.path.isfile(prefix + ".json"):
            missing.append(unit.id)
            continue
        with open(prefix + ".json", encoding="utf-8") as f:
            record = json.load(f)
        with np.load(prefix + ".npz") as z:
            arrays = {k: z[k] for k in z.files}
        parts.append((prefix, record, arrays))
    if missing:
        raise DataError(
            f"{dataset_dir}: {len(missing)} of {len(units)} parts are not prepared yet "
            f"(e.g. {missing[0]}); run the remaining --shard-index jobs first"
        )
    return parts


def _held_out_when_empty(parts: list, drop: np.ndarray, val_fraction: float) -> set[int]:
    """Keys of kept documents to move to val when the hash split left val empty: ceil(val_fraction x kept) of
    them (at least one, never all), those whose hashes come nearest the val range, so the choice is the same
    however the work was sharded. Empty when val already has documents, val_fraction is 0 or fewer than two
    documents are kept."""
    if val_fraction <= 0 or not parts:
        return set()
    split = np.concatenate([a["split"] for _, _, a in parts])
    kept = ~drop
    if (split[kept] == 1).any() or kept.sum() < 2:
        return set()
    hashes = np.concatenate([a["hash"] for _, _, a in parts]).view(np.uint64)
    keys = np.flatnonzero(kept)
    n = min(max(1, math.ceil(val_fraction * len(keys))), len(keys) - 1)
    return {int(k) for k in keys[np.argsort(hashes[keys], kind="stable")[:n]]}


def merge_dataset(
    spec: SourceSpec, units: list[WorkUnit], dataset_dir: str, cfg: DataConfig, tokenizer_info: dict
) -> dict:
    manifest_path = os.path.join(dataset_dir, DATASET_MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the dataset is incomplete until the new manifest is written
    parts = _load_parts(dataset_dir, units)
    stats: dict[str, int] = {}
    for _, record, _ in parts:
        for k, v in record["stats"].items():
            stats[k] = stats.get(k, 0) + v
    expand_paths(spec, skipped=stats)  # files the directory walk passed over, by extension

    # Global keys: (part number, row) flattened in part order; first occurrence wins.
    offsets = np.cumsum([0] + [len(a["hash"]) for _, _, a in parts])
    drop = np.zeros(int(offsets[-1]), dtype=bool)
    if cfg.dedup.exact and len(drop):
        hashes = np.concatenate([a["hash"] for _, _, a in parts])
        _, first = np.unique(hashes, return_index=True)
        exact = np.ones(len(hashes), dtype=bool)
        exact[first] = False
        drop |= exact
        stats["dropped:exact_duplicate"] = int(exact.sum())
    if cfg.dedup.near and len(drop):

        def signatures() -> Iterator[tuple[int, np.ndarray]]:
            for p, (_, _, arrays) in enumerate(parts):
                for row, sig in enumerate(arrays["sig"]):
                    key = int(offsets[p]) + row
                    if not drop[key]:
                        yield key, sig

        near = near_duplicates(signatures(), cfg.dedup)
        drop[list(near)] = True
        stats["dropped:near_duplicate"] = len(near)

    to_val = _held_out_when_empty(parts, drop, cfg.val_fraction)
    if len(to_val):
        stats["val:assigned_when_empty"] = len(to_val)
    dtype = np.dtype(tokenizer_info["dtype"])
    writers = {s: ShardWriter(dataset_dir, s, dtype, cfg.shard_tokens) for s in SPLITS}
    for p, (prefix, _, arrays) in enumerate(parts):
        readers = {s: IndexedDataset(f"{prefix}.{s}") for s in SPLITS}
        for row, (split, index) in enumerate(zip(arrays["split"], arrays["index"])):
            key = int(offsets[p]) + row
            if not drop[key]:
                tokens = readers[SPLITS[int(split)]][int(index)]
                writers["val" if key in to_val else SPLITS[int(split)]].add(tokens)
                lang = str(arrays["lang"][row]) if "lang" in arrays else ""
                if lang:
                    stats[f"lang_kept:{lang}"] = stats.get(f"lang_kept:{lang}", 0) + 1
                    stats[f"lang_tokens:{lang}"] = stats.get(f"lang_tokens:{lang}", 0) + len(tokens)
    shards = {s: w.close() for s, w in writers.items()}
    keep = {f"{sh['prefix']}{ext}" for s in SPLITS for sh in shards[s] for ext in (".bin", ".idx")}
    for old in glob.glob(os.path.join(dataset_dir, "*-[0-9][0-9][0-9][0-9][0-9].*")):
        if os.path.basename(old) not in keep:
            os.remove(old)  # shards of an earlier, larger merge
    stats["kept"] = int((~drop).sum())
    manifest = {
        "format": "megatron-indexed-v1",
        "source": {"name": spec.name, "type": spec.type, "paths": spec.paths},
        "tokenizer": tokenizer_info,
        "dtype": dtype.name,
        "val_fraction": cfg.val_fraction,
        "splits": {
            s: {
                "documents": sum(x["documents"] for x in shards[s]),
                "tokens": sum(x["tokens"] for x in shards[s]),
                "shards": shards[s],
            }
            for s in SPLITS
        },
        "stats": dict(sorted(stats.items())),
        "parts": len(parts),
        "files": {name: file_digest(os.path.join(dataset_dir, name)) for name in sorted(keep)},
    }
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest


def read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, DATASET_MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(manifest_path)
    with open(manifest_path, encoding="utf-8") as f:
        return json.load(f)
