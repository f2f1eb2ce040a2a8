"""Raw text → tokenizer → train/val token shards (indexed format) + manifest.json, in one pass."""

from __future__ import annotations

import hashlib
import json
import os
import time

from llmforge.config.recipe import Recipe
from llmforge.data.indexed import IndexedDatasetWriter, token_dtype
from llmforge.data.sources import iter_text_documents
from llmforge.errors import RecipeError
from llmforge.tokenizer import Tokenizer, fingerprint, load_tokenizer, save_tokenizer
from llmforge.tokenizer.char import CharTokenizer

MANIFEST = "manifest.json"


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic split by document content hash."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return h / 2**64 < val_fraction


def file_digest(path: str) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"size": os.path.getsize(path), "sha256": sha.hexdigest()}


def train_tokenizer(recipe: Recipe, origin: str) -> Tokenizer:
    """Train the recipe's tokenizer on its data.sources and save it to tokenizer.path."""
    if not recipe.tokenizer.path:
        raise RecipeError(origin, "tokenizer.path", "is required: where to write the trained tokenizer")
    if not recipe.data.sources:
        raise RecipeError(origin, "data.sources", "is empty: nothing to train the tokenizer on")
    tok = CharTokenizer.train((text for _, text in iter_text_documents(recipe.data.sources)),
                              recipe.tokenizer.vocab_size)
    save_tokenizer(tok, recipe.tokenizer.path)
    return tok


def prepare(recipe: Recipe, origin: str) -> dict:
    """Tokenize data.sources into data.prepared_dir/{train,val}.{bin,idx} and write manifest.json last."""
    out = recipe.data.prepared_dir
    if not out:
        raise RecipeError(origin, "data.prepared_dir", "is required: where to write the token shards")
    if not recipe.data.sources:
        raise RecipeError(origin, "data.sources", "is empty: no input files to prepare")
    tok = load_tokenizer(recipe.tokenizer, origin)
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the directory is incomplete until the new manifest lands
    dtype = token_dtype(tok.vocab_size)
    writers = {split: IndexedDatasetWriter(os.path.join(out, split), dtype) for split in ("train", "val")}
    stats = {split: {"documents": 0, "tokens": 0} for split in writers}
    started = time.time()
    for _, text in iter_text_documents(recipe.data.sources):
        if not text:
            continue
        split = "val" if is_validation(text, recipe.data.val_fraction) else "train"
        ids = tok.encode(text)
        ids.append(tok.eos_id)
        writers[split].add_document(ids)
        stats[split]["documents"] += 1
        stats[split]["tokens"] += len(ids)
    for w in writers.values():
        w.finalize()
    files = {name: file_digest(os.path.join(out, name))
             for split in writers for name in (f"{split}.bin", f"{split}.idx")}
    manifest = {
        "format": "megatron-indexed-v1",
        "tokenizer": {"type": recipe.tokenizer.type, "fingerprint": fingerprint(tok), "vocab_size": tok.vocab_size},
        "dtype": dtype.name,
        "sources": recipe.data.sources,
        "val_fraction": recipe.data.val_fraction,
        "splits": stats,
        "files": files,
        "seconds": round(time.time() - started, 3),
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)
    return manifest


def read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(manifest_path)
    with open(manifest_path, encoding="utf-8") as f:
        return json.load(f)
