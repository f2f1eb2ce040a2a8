"""Per-worker stage of preparation: one work unit → cleaned, filtered, decontaminated, tokenized part files.

A part is `<dataset>/parts/<unit>.{train,val}.{bin,idx}` (indexed format) + `<unit>.npz` (split, position, exact
hash and MinHash signature of every written document) + `<unit>.json` (counters), the JSON written last: a unit
whose JSON exists is complete and is skipped when preparation is run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Optional

import numpy as np

from llmforge.config.data import DataConfig, SourceSpec
from llmforge.data.clean import clean_text
from llmforge.data.dedup import exact_hash, is_contaminated, minhash_signature
from llmforge.data.filters import clean_lines, code_quality, web_quality
from llmforge.data.indexed import IndexedDatasetWriter, token_dtype
from llmforge.data.language import identify
from llmforge.data.sources import Document, Stats, WorkUnit, count, read_unit
from llmforge.tokenizer import Tokenizer, encode_batch

SPLITS = ("train", "val")
BATCH = 64
PIPELINE_VERSION = 5  # bump when cleaning/filtering semantics change: parts made by another version are redone


def processing_key(spec: SourceSpec, cfg: DataConfig, tokenizer_fingerprint: str) -> str:
    """Everything that decides a part's content; a part made under another key is stale and is processed again."""
    relevant: dict[str, Any] = {
        "version": PIPELINE_VERSION,
        "source": dataclasses.asdict(spec),
        "tokenizer": tokenizer_fingerprint,
        "val_fraction": cfg.val_fraction,
        "chunk_chars": cfg.chunk_chars,
        "min_chars": cfg.min_chars,
        "max_chars": cfg.max_chars,
        "lines": dataclasses.asdict(cfg.line_filters),
        "web": dataclasses.asdict(cfg.web_filters),
        "code": dataclasses.asdict(cfg.code_filters),
        "dedup": dataclasses.asdict(cfg.dedup),
        "decontaminate": dataclasses.asdict(cfg.decontaminate),
    }
    relevant["source"].pop("weight")  # blending weight does not change the data
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def is_validation(h: int, val_fraction: float) -> bool:
    """Deterministic train/val split by the document's (normalised-text) hash."""
    return (h & 0xFFFFFFFFFFFFFFFF) / 2**64 < val_fraction


def part_prefix(dataset_dir: str, unit: WorkUnit) -> str:
    return os.path.join(dataset_dir, "parts", unit.id)


def part_complete(dataset_dir: str, unit: WorkUnit, key: str) -> bool:
    path = part_prefix(dataset_dir, unit) + ".json"
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return record.get("files") == unit.files and record.get("key") == key


PLAIN_TYPES = ("text", "latex", "jsonl", "parquet")  # long documents of these are cut into data.chunk_chars pieces


def document_language(text: str, spec: SourceSpec) -> tuple[Optional[str], float]:
    """(language label, probability) of a cleaned document; (None, 0.0) for a source that is not identified."""
    return identify(text) if spec.identifies_language else (None, 0.0)


def clean_document(doc: Document, spec: SourceSpec, cfg: DataConfig, stats: Optional[Stats] = None) -> str:
    """The document's text after cleaning; web-quality text also loses the lines the line rules remove (counted in
    `stats`). Sets doc.meta's `language` and `language_score` for a source whose documents are identified."""
    mode = "code" if spec.type == "code" else "web" if spec.type in ("html", "warc") else "plain"
    text = clean_text(doc.text, mode)
    lang, score = document_language(text, spec)
    if lang is not None:
        doc.meta["language"], doc.meta["language_score"] = lang, score
    if spec.quality_kind == "web" and not language_reason(doc, spec):
        text = clean_lines(text, spec.line_filters or cfg.line_filters, stats, lang)
    return text


def language_reason(doc: Document, spec: SourceSpec) -> Optional[str]:
    """'language' when the source keeps chosen languages and the document is not one of them (or is, with too low
    a probability), else None."""
    if spec.languages == "all":
        return None
    lang, score = doc.meta.get("language"), doc.meta.get("language_score", 0.0)
    return None if lang in spec.languages and score >= spec.min_language_score else "language"


def piece_reason(
    text: str,
    doc: Document,
    spec: SourceSpec,
    cfg: DataConfig,
    eval_ngrams: set[int],
    stats: Optional[Stats] = None,
) -> Optional[str]:
    """None to keep a cleaned document (or piece of one), else the reason it is dropped."""
    if len(text) < max(cfg.min_chars, 1) or not text.strip():
        return "empty"
    reason = language_reason(doc, spec)
    if reason:
        return reason
    if len(text) > cfg.max_chars:
        return "too_long"
    kind = spec.quality_kind
    if kind == "web":
        reason = web_quality(text, cfg.web_filters, doc.meta.get("language"), stats)
    elif kind == "code":
        reason = code_quality(text, cfg.code_filters, doc.meta.get("bytes"))
    if reason is None and is_contaminated(text, eval_ngrams, cfg.decontaminate.ngram):
        reason = "contaminated"
    return reason


def document_pieces(
    doc: Document, spec: SourceSpec, cfg: DataConfig, eval_ngrams: set[int], stats: Optional[Stats] = None
) -> list[tuple[str, Optional[str]]]:
    """(piece, None) to keep or (piece, reason) to drop, for every piece of one document. A long plain-text document
    is cut into data.chunk_chars pieces first and each piece is filtered on its own, so data.max_chars applies to
    pieces: one large text file is never dropped whole."""
    text = clean_document(doc, spec, cfg, stats)
    pieces = chunks(text, cfg.chunk_chars) if spec.type in PLAIN_TYPES else [text]
    if len(pieces) > 1 and stats is not None:
        count(stats, "chunked:documents")
        count(stats, "chunked:pieces", len(pieces))
    return [(p, piece_reason(p, doc, spec, cfg, eval_ngrams, stats)) for p in pieces or [text]]


def chunks(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each ending at a line break (at a blank line where one
    falls in the last quarter of the piece); one piece when it is short enough or size is 0."""
    if not size or len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n\n", start + 3 * size // 4, end)
        if cut < 0:
            cut = text.rfind("\n", start + size // 2, end)
        cut = end if cut < 0 else cut + 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return [p for p in out if p.strip()]


def _line_bytes(stats: Stats) -> int:
    return sum(v for k, v in stats.items() if k.startswith("lines_removed_bytes:"))


def process_unit(
    unit: WorkUnit,
    spec: SourceSpec,
    cfg: DataConfig,
    tok: Tokenizer,
    dataset_dir: str,
    eval_ngrams: set[int],
    key: str,
    progress: Optional[Any] = None,
) -> dict:
    """Write one part; returns its counters (documents, bytes, tokens and drop reasons). `progress`: a shared
    [bytes, documents] array the bytes and documents read are added to as they are read (a progress bar's)."""
    started = time.time()
    prefix = part_prefix(dataset_dir, unit)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: IndexedDatasetWriter(f"{prefix}.{s}", dtype) for s in SPLITS}
    stats: Stats = {}
    rows_split, rows_index, rows_hash, rows_sig, rows_lang = [], [], [], [], []
    pending: list[tuple[str, int, np.ndarray, str]] = []

    def flush() -> None:
        for (_text, h, sig, lang), ids in zip(pending, encode_batch(tok, [p[0] for p in pending])):
            split = 1 if is_validation(h, cfg.val_fraction) else 0
            name = SPLITS[split]
            rows_split.append(split)
            rows_index.append(len(writers[name].lengths))
            rows_hash.append(h)
            rows_sig.append(sig)
            rows_lang.append(lang)
            ids.append(tok.eos_id)
            writers[name].add_document(ids)
            count(stats, f"tokens_before_dedup:{name}", len(ids))
        pending.clear()

    def advance(nbytes: int, docs: int = 0) -> None:
        if progress is not None:
            with progress.get_lock():
                progress[0] += nbytes
                progress[1] += docs

    for doc in read_unit(unit, spec, stats):
        size = len(doc.text.encode("utf-8", errors="replace"))
        count(stats, "read")
        count(stats, "bytes", size)
        done = 0
        line_bytes = _line_bytes(stats)
        pieces = document_pieces(doc, spec, cfg, eval_ngrams, stats)
        lang = doc.meta.get("language")
        if lang is not None:
            count(stats, f"lang:{lang}")
            count(stats, f"lang_bytes:{lang}", size)
            if _line_bytes(stats) > line_bytes:
                count(stats, f"lang_dropped_bytes:{lang}:line_rules", _line_bytes(stats) - line_bytes)
        for piece, reason in pieces:
            piece_bytes = len(piece.encode("utf-8", errors="replace"))
            if reason is not None:
                count(stats, f"dropped:{reason}")
                count(stats, f"dropped_bytes:{reason}", piece_bytes)
                if lang is not None:
                    count(stats, f"lang_dropped_bytes:{lang}:{reason}", piece_bytes)
            else:
                count(stats, "passed_bytes", piece_bytes)
                if lang is not None:
                    count(stats, f"lang_passed_bytes:{lang}", piece_bytes)
                sig = minhash_signature(piece, cfg.dedup) if cfg.dedup.near else np.zeros(0, dtype=np.uint64)
                pending.append((piece, exact_hash(piece), sig, lang or ""))
                if len(pending) >= BATCH:
                    flush()
            step = min(piece_bytes, size - done)  # a large document moves the bar piece by piece
            advance(step)
            done += step
        advance(size - done, 1)
    flush()
    for w in writers.values():
        w.finalize()
    np.savez(
        prefix + ".npz.tmp.npz",
        split=np.asarray(rows_split, dtype=np.uint8),
        index=np.asarray(rows_index, dtype=np.int64),
        hash=np.asarray(rows_hash, dtype=np.int64),
        sig=np.asarray(rows_sig, dtype=np.uint64).reshape(len(rows_sig), cfg.dedup.num_perm if cfg.dedup.near else 0),
        lang=np.asarray(rows_lang, dtype="U8"),
    )
    os.replace(prefix + ".npz.tmp.npz", prefix + ".npz")
    stats["written"] = len(rows_split)
    record = {
        "unit": unit.id,
        "files": unit.files,
        "key": key,
        "stats": stats,
        "seconds": round(time.time() - started, 3),
    }
    with open(prefix + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(prefix + ".json.tmp", prefix + ".json")
    return stats
