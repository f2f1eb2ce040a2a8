"""Exact and near-duplicate detection, and evaluation-set decontamination.

Workers compute per-document exact hashes and MinHash signatures (datasketch); the merge step runs one global pass
over all workers' hashes and signatures (MinHash LSH), so duplicates are found across workers and nodes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import numpy as np

from llmforge.config.data import DecontamConfig, DedupConfig
from llmforge.data.clean import normalized_for_hash
from llmforge.errors import DataError

MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # datasketch >= 2.0 default; stored signatures are only comparable within one scheme


def exact_hash(text: str) -> int:
    """64-bit hash of the normalised text (as a signed int64, for numpy storage)."""
    digest = hashlib.blake2b(normalized_for_hash(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _shingles(text: str, n: int) -> list[bytes]:
    words = normalized_for_hash(text).split()
    if len(words) < n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    m.update_batch(_shingles(text, cfg.ngram))
    return m.hashvalues.astype(np.uint64)


def near_duplicates(signatures: Iterable[tuple[int, np.ndarray]], cfg: DedupConfig) -> set[int]:
    """Keys of documents whose signature collides (LSH) with an earlier kept document's; first occurrence wins."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    dups: set[int] = set()
    for key, sig in signatures:
        m = LeanMinHash(seed=MINHASH_SEED, hashvalues=sig, scheme=MINHASH_SCHEME)
        if lsh.query(m):
            dups.add(key)
        else:
            lsh.insert(key, m, check_duplication=False)
    return dups


def _word_ngrams(text: str, n: int) -> Iterator[int]:
    words = normalized_for_hash(text).split()
    for i in range(len(words) - n + 1):
        yield int.from_bytes(
            hashlib.blake2b(" ".join(words[i : i + n]).encode("utf-8"), digest_size=8).digest(), "little"
        )


def load_eval_ngrams(cfg: DecontamConfig) -> set[int]:
    """Hashed word n-grams of the evaluation files (plain text, or JSONL fields listed in text_fields)."""
    grams: set[int] = set()
    for path in cfg.paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"data.decontaminate.paths: cannot read {path} ({e.strerror})") from None
        texts = [raw]
        if path.endswith((".jsonl", ".json")):
            texts = []
            for line in raw.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    texts.extend(str(rec[k]) for k in cfg.text_fields if k in rec)
        for text in texts:
            grams.update(_word_ngrams(text, cfg.ngram))
    return grams


def is_contaminated(text: str, eval_ngrams: set[int], n: int) -> bool:
    if not eval_ngrams:
        return False
    return any(g in eval_ngrams for g in _word_ngrams(text, n))
