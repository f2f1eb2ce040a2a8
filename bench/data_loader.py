"""Training-side data loader: time to open a dataset of 10,000 shard files, and loader tokens/s per rank.

1. Writes N one-document shards (.bin/.idx + manifest, as prepare_data does) and times `PretrainData(...)` on them
   (what every rank does at start-up and on resume), then one batch from the middle.
2. Writes a blend of two datasets (8 shards of 4M uint16 tokens each, and 2 shards of 2M) and times
   `PretrainData.batch()` for rank 0's micro-batches of a data-parallel world of 8 (12 x 2048 tokens each), i.e. the
   tokens one rank's training loop receives per second from the loader alone.

    python bench/data_loader.py            # 10,000 shards
    python bench/data_loader.py --quick    # 500 shards, fewer batches (the test runs this)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_file import write_result


def write_dataset(root: str, shard_tokens: list[int], vocab: int = 32000, seed: int = 0) -> str:
    from llmforge.data.indexed import IndexedDatasetWriter

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, files = [], {}
    for i, n in enumerate(shard_tokens):
        prefix = f"train-{i:05d}"
        w = IndexedDatasetWriter(os.path.join(root, prefix), np.uint16)
        w.add_document(rng.integers(0, vocab, n, dtype=np.uint16))
        w.finalize()
        shards.append({"prefix": prefix, "documents": 1, "tokens": n})
    for name in os.listdir(root):
        files[name] = {"size": os.path.getsize(os.path.join(root, name)), "sha256": "-"}
    manifest = {
        "tokenizer": {"fingerprint": "bench"},
        "dtype": "uint16",
        "files": files,
        "splits": {
            "train": {"documents": len(shards), "tokens": sum(shard_tokens), "shards": shards},
            "val": {"documents": 0, "tokens": 0, "shards": []},
        },
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.shards, args.batches = 500, 20

    from llmforge.config.data import DatasetSpec
    from llmforge.data.loader import PretrainData, micro_batch_indices

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        many = write_dataset(os.path.join(tmp, "many"), [130] * args.shards)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        data = PretrainData([DatasetSpec(many)], 64, seed=0)
        open_s = time.perf_counter() - started
        started = time.perf_counter()
        data.batch(range(data.num_samples // 2, data.num_samples // 2 + 32))
        first_batch_s = time.perf_counter() - started

        scale = 4 if args.quick else 1
        a = write_dataset(os.path.join(tmp, "a"), [4_000_000 // scale] * 8, seed=1)
        b = write_dataset(os.path.join(tmp, "b"), [2_000_000 // scale] * 2, seed=2)
        seq, micro, world = 2048, 12, 8
        blend = PretrainData([DatasetSpec(a, 0.7), DatasetSpec(b, 0.3)], seq, seed=0)
        blend.batch(micro_batch_indices(0, 0, 0, world, micro))  # first touch of the files
        started = time.perf_counter()
        for step in range(args.batches):
            x, y = blend.batch(micro_batch_indices(step * micro * world, 0, 0, world, micro))
        load_s = time.perf_counter() - started
        tokens_per_s = args.batches * micro * seq / load_s

    lines = [
        f"# Data loader, {datetime.date.today()}",
        "",
        f"Command: `python bench/data_loader.py{' --quick' if args.quick else ''}` on {os.cpu_count()} cores "
        "(page cache warm: the shards were just written).",
        "",
        "| what | result |",
        "|---|---|",
        f"| open a dataset of {args.shards:,} shard files (`PretrainData(...)`) | {open_s:.3f} s "
        f"(writing them: {write_s:.1f} s) |",
        f"| first batch of 32 from the middle of it | {first_batch_s * 1000:.1f} ms |",
        f"| loader, rank 0 of 8, micro-batch {micro} x {seq}, 0.7/0.3 blend of 2 datasets, {args.batches} "
        f"batches | {tokens_per_s:,.0f} tokens/s per rank ({load_s / args.batches * 1000:.2f} ms per batch) |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(text, args.out, f"cpu-{datetime.date.today()}-data-loader.md")


if __name__ == "__main__":
    main()
