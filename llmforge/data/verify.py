"""Checks of a prepared dataset against its manifest: `llmforge verify-data DIR` (everything: every file's sha256,
every index's structure, every token id against the vocabulary), and the cheap part training does at open on every
rank (sizes and index headers always; sha256 too when the dataset is small: `data.verify_mb`)."""

from __future__ import annotations

import os

import numpy as np

from llmforge.data.indexed import IndexedDataset, read_index_header
from llmforge.data.merge import read_manifest
from llmforge.errors import DataError
from llmforge.fileio import sha256_file

SCAN_TOKENS = 1 << 24  # tokens per read when scanning a .bin for ids outside the vocabulary


def check_shard_files(directory: str, manifest: dict, split: str, hash_limit_mb: float = 0.0) -> None:
    """Every shard file of a split exists with the manifest's size and its index header agrees with the manifest
    (dtype, documents); when the split's files total at most `hash_limit_mb` MB, their sha256 too. The first
    problem is a DataError naming the file (one stat and a 34-byte read per shard; no token is read)."""
    files, shards = manifest["files"], manifest["splits"][split]["shards"]
    names = [shard["prefix"] + ext for shard in shards for ext in (".bin", ".idx")]
    for name in names:
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise DataError(f"{path}: missing (listed in {directory}/manifest.json)") from None
        if size != files[name]["size"]:
            raise DataError(
                f"{path}: {size} bytes, the manifest says {files[name]['size']} (truncated or "
                f"replaced); re-run launch/prepare_data.py"
            )
    for shard in shards:
        path = os.path.join(directory, shard["prefix"] + ".idx")
        try:
            dtype, sequences, _ = read_index_header(path)
        except ValueError as e:
            raise DataError(f"{e}; re-run launch/prepare_data.py") from None
        if dtype != np.dtype(manifest["dtype"]) or sequences != shard["documents"]:
            raise DataError(
                f"{path}: its header says {sequences} documents of {dtype.name}, the manifest says "
                f"{shard['documents']} of {manifest['dtype']}; re-run launch/prepare_data.py"
            )
    if hash_limit_mb > 0 and sum(files[n]["size"] for n in names) <= hash_limit_mb * 1e6:
        for name in names:
            if sha256_file(os.path.join(directory, name)) != files[name]["sha256"]:
                raise DataError(
                    f"{os.path.join(directory, name)}: its sha256 differs from the manifest's (the file "
                    f"was changed after preparation); re-run launch/prepare_data.py"
                )


def out_of_vocabulary(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Positions of token ids outside [0, vocab_size)."""
    return (
        np.flatnonzero((tokens >= vocab_size) | (tokens < 0))
        if tokens.dtype.kind == "i"
        else np.flatnonzero(tokens >= vocab_size)
    )


def verify_dataset(directory: str) -> list[str]:
    """Everything that can be checked without the raw corpus; returns one line per problem (empty: intact)."""
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        raise DataError(f"{directory}: not a prepared dataset (no manifest.json)") from None
    problems = []
    for name, want in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != want["size"]:
            problems.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {want['size']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest's")
    vocab = manifest["tokenizer"].get("vocab_size")
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            prefix = os.path.join(directory, shard["prefix"])
            if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
                continue  # reported above
            problems.extend(_verify_shard(prefix, shard, vocab))
    return problems


def _verify_shard(prefix: str, shard: dict, vocab: int | None) -> list[str]:
    try:
        ds = IndexedDataset(prefix)
    except ValueError as e:
        return [str(e)]
    lengths = ds.lengths.astype(np.int64)
    item = ds.dtype.itemsize
    if len(ds) != shard["documents"] or int(lengths.sum()) != shard["tokens"]:
        return [
            f"{prefix}.idx: {len(ds)} documents of {int(lengths.sum())} tokens, the manifest says "
            f"{shard['documents']} of {shard['tokens']}"
        ]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * item
    if not np.array_equal(ds.pointers, starts) or ds.num_tokens != int(lengths.sum()):
        return [f"{prefix}.idx: its document pointers do not match its lengths and {prefix}.bin"]
    if vocab is None:
        return []
    bounds = np.cumsum(lengths)
    for start in range(0, ds.num_tokens, SCAN_TOKENS):
        bad = out_of_vocabulary(np.asarray(ds.tokens[start : start + SCAN_TOKENS]), vocab)
        if len(bad):
            pos = start + int(bad[0])
            doc = int(np.searchsorted(bounds, pos, side="right"))
            return [
                f"{prefix}.bin: token id {int(ds.tokens[pos])} at token {pos} (document {doc}) is outside "
                f"the vocabulary of {vocab}"
            ]
    return []
