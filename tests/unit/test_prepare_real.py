"""Preparation of real inputs end to end: one large text file still gets a validation split (cut into pieces, and
a val document guaranteed when the hash split leaves none), training refuses an empty val split when evaluation is
on, WARC resource records are read, and a trained sentencepiece tokenizer is used without a vocab_size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmforge.config import load_recipe
from llmforge.config.data import SourceSpec
from llmforge.data.indexed import IndexedDataset
from llmforge.data.pipeline import chunks
from llmforge.data.prepare import prepare, train_tokenizer
from llmforge.data.sources import reader_for
from llmforge.tokenizer import load_tokenizer
from tests.conftest import REPO, run_cli, write_recipe
from tests.real_inputs import STDLIB, python_doc_pages, write_warc

# The interpreter's help topics: one real 750 KB file of English text, like a single-file book corpus.
BIG_TEXT = STDLIB / "pydoc_data" / "topics.py"


def decoded(dataset: Path, tok, split: str) -> list[str]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        ds = IndexedDataset(str(dataset / shard["prefix"]))
        out += [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))]
    return out


def one_file_recipe(tmp: Path, **data) -> tuple[object, str]:
    (tmp / "corpus").mkdir(exist_ok=True)
    (tmp / "corpus" / "book.txt").write_bytes(BIG_TEXT.read_bytes())
    path = write_recipe(
        tmp / "r.yaml",
        tmp,
        tmp / "runs",
        data={
            "sources": [{"name": "book", "type": "text", "paths": [str(tmp / "corpus")]}],
            "prepared_dir": str(tmp / "prepared"),
            "val_fraction": 0.01,
            "seq_len": 64,
            **data,
        },
        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
        train={"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 1},
    )
    return load_recipe(str(path)), str(path)


def test_one_large_text_file_gets_a_validation_split(tmp_path):
    recipe, origin = one_file_recipe(tmp_path)
    train_tokenizer(recipe, origin)
    tok = load_tokenizer(recipe.tokenizer, origin)
    m = prepare(recipe, origin, progress=False)["book"]
    pieces = m["stats"]["chunked:pieces"]
    assert m["stats"]["chunked:documents"] == 1 and pieces >= 10  # 757 KB in pieces of about 64 KiB
    assert m["splits"]["val"]["documents"] >= 1 and m["splits"]["train"]["documents"] >= pieces - 2
    train, val = (
        decoded(tmp_path / "prepared" / "book", tok, "train"),
        decoded(tmp_path / "prepared" / "book", tok, "val"),
    )
    original = BIG_TEXT.read_text()
    assert len(train) + len(val) == pieces
    assert sum(map(len, train + val)) == len(original.strip())  # every character is in exactly one piece
    for piece in train + val:
        assert piece in original


def test_chunks_cut_at_line_breaks_and_lose_nothing():
    text = BIG_TEXT.read_text()
    pieces = chunks(text, 10_000)
    assert "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-1]) and all(len(p) <= 10_000 for p in pieces)
    assert chunks(text, 0) == [text] and chunks("short", 10) == ["short"]


def test_when_the_hash_split_leaves_val_empty_one_document_is_held_out(tmp_path):
    recipe, origin = one_file_recipe(tmp_path, chunk_chars=0, val_fraction=0.001)
    for name in ("textwrap.py", "shlex.py"):
        (tmp_path / "corpus" / f"{name}.txt").write_bytes((STDLIB / name).read_bytes())
    train_tokenizer(recipe, origin)
    m = prepare(recipe, origin, progress=False)["book"]
    assert m["stats"]["val:assigned_when_empty"] == 1
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 2


def test_training_with_an_empty_val_split_and_eval_on_is_refused(tmp_path):
    recipe, origin = one_file_recipe(tmp_path, val_fraction=0.0)
    train_tokenizer(recipe, origin)
    prepare(recipe, origin, progress=False)
    r = run_cli(sys.executable, str(REPO / "launch" / "pretrain.py"), "--recipe", origin)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert "eval.interval is 6 but the val split of" in line and "data.val_fraction > 0" in line
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
    r = run_cli(
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--recipe",
        origin,
        "--set",
        "eval.interval=0",
        "--set",
        "checkpoint.interval=0",
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_warc_resource_records_are_read(tmp_path):
    pages = python_doc_pages(3)
    write_warc(tmp_path / "res.warc.gz", pages, resource=True)
    stats: dict = {}
    spec = SourceSpec(name="w", type="warc", paths=[str(tmp_path)])
    docs = list(reader_for("warc")(str(tmp_path / "res.warc.gz"), spec, stats))
    assert len(docs) == 3 and stats == {"warc:resource_records": 3}
    assert docs[0].meta["url"].endswith(pages[0].name) and len(docs[0].text) > 1000


def test_prepare_uses_a_trained_sentencepiece_tokenizer_without_vocab_size(tmp_path):
    (tmp_path / "corpus").mkdir()
    for name in ("textwrap.py", "shlex.py", "argparse.py"):
        (tmp_path / "corpus" / f"{name}.txt").write_bytes((STDLIB / name).read_bytes())
    tok = {"type": "sentencepiece", "path": str(tmp_path / "sp.model")}
    train_path = write_recipe(
        tmp_path / "train.yaml", tmp_path, tmp_path / "runs", tokenizer={**tok, "vocab_size": 400}
    )
    no_vocab = write_recipe(tmp_path / "use.yaml", tmp_path, tmp_path / "runs", tokenizer=tok)
    r = run_cli(sys.executable, str(REPO / "launch" / "train_tokenizer.py"), "--recipe", str(no_vocab))
    assert r.returncode == 2 and "tokenizer.vocab_size: is required to train a sentencepiece tokenizer" in r.stderr
    train_tokenizer(load_recipe(str(train_path)), str(train_path))
    r = run_cli(sys.executable, str(REPO / "launch" / "prepare_data.py"), "--recipe", str(no_vocab))
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "prepared" / "stdlib" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 400 and manifest["splits"]["train"]["documents"] >= 2
