"""Preparation of real inputs end to end: one large text file still gets a validation split (cut into pieces, and
a val document guaranteed when the hash split leaves none), training refuses an empty val split when evaluation is
on, WARC resource records are read, and a trained sentencepiece tokenizer is used without a vocab_size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmforge.config.data import SourceSpec
from llmforge.data.indexed import IndexedDataset
from llmforge.data.loader import PretrainData
from llmforge.data.pipeline import chunks
from llmforge.data.prepare import prepare, train_tokenizer
from llmforge.data.sources import reader_for
from llmforge.errors import DataError
from llmforge.tokenizer import load_tokenizer
from tests.helpers import BIG_TEXT, one_file_recipe
from tests.real_inputs import STDLIB, python_doc_pages, write_warc

# The interpreter's help topics: one real 750 KB file of English text, like a single-file book corpus.


def decoded(dataset: Path, tok, split: str) -> list[str]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        ds = IndexedDataset(str(dataset / shard["prefix"]))
        out += [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))]
    return out


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


def test_warc_resource_records_are_read(tmp_path):
    pages = python_doc_pages(3)
    write_warc(tmp_path / "res.warc.gz", pages, resource=True)
    stats: dict = {}
    spec = SourceSpec(name="w", type="warc", paths=[str(tmp_path)])
    docs = list(reader_for("warc")(str(tmp_path / "res.warc.gz"), spec, stats))
    assert len(docs) == 3 and stats == {"warc:resource_records": 3}
    assert docs[0].meta["url"].endswith(pages[0].name) and len(docs[0].text) > 1000


def test_a_text_file_longer_than_max_chars_is_cut_before_it_is_filtered(tmp_path):
    # 757 KB in one file, data.max_chars 500,000: the file is cut into ~64 KiB pieces first, and the pieces pass.
    recipe, origin = one_file_recipe(tmp_path, max_chars=500_000)
    train_tokenizer(recipe, origin)
    lines: list[str] = []
    m = prepare(recipe, origin, progress=False, report=lines.append)["book"]
    assert m["stats"]["read"] == 1 and m["stats"]["kept"] >= 10 and "dropped:too_long" not in m["stats"]
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] > 700_000  # characters: every one kept
    pieces = m["stats"]["chunked:pieces"]
    assert m["stats"]["kept"] == pieces and m["stats"]["chunked:documents"] == 1
    assert len(lines) == 1 and lines[0].startswith(
        f"book: read 1 documents (1 cut into {pieces} pieces), kept {pieces} documents and pieces; "
    )


def test_a_source_that_keeps_nothing_stops_prepare_naming_the_reason_and_its_key(tmp_path):
    recipe, origin = one_file_recipe(tmp_path, chunk_chars=0, max_chars=500_000)
    train_tokenizer(recipe, origin)
    lines: list[str] = []
    with pytest.raises(DataError) as e:
        prepare(recipe, origin, progress=False, report=lines.append)
    assert (
        str(e.value) == "data.sources[book] kept no documents: read 1 documents; dropped 1 too_long "
        "(data.max_chars, data.chunk_chars)"
    )
    assert lines[-1].startswith("WARNING book: kept no documents")


def test_a_rule_that_takes_most_of_the_bytes_is_a_warning(tmp_path):
    recipe, origin = one_file_recipe(tmp_path, chunk_chars=0, max_chars=500_000)
    (tmp_path / "corpus" / "shlex.txt").write_bytes((STDLIB / "shlex.py").read_bytes())
    train_tokenizer(recipe, origin)
    lines: list[str] = []
    m = prepare(recipe, origin, progress=False, report=lines.append)["book"]
    assert m["stats"]["kept"] == 1 and m["stats"]["dropped_bytes:too_long"] > 0.99 * BIG_TEXT.stat().st_size
    assert len(lines) == 3 and lines[2].startswith("WARNING book: 9") and "as too_long (data.max_chars" in lines[2]
    assert re.fullmatch(r"book: removed 9\d\.\d% of \d+ bytes: too_long 9\d\.\d%(, cleaning 0\.\d%)?", lines[1])


def test_a_split_too_small_to_train_names_the_dataset_and_its_counts(tmp_path):
    recipe, origin = one_file_recipe(tmp_path)
    (tmp_path / "corpus" / "book.txt").write_bytes((STDLIB / "shlex.py").read_bytes()[:3000])
    train_tokenizer(recipe, origin)
    prepare(recipe, origin, progress=False)
    with pytest.raises(DataError) as e:
        PretrainData(recipe.data.dataset_dirs(), 4096, 0, "train")
    msg = str(e.value)
    assert "book: no training sample: its train split holds " in msg and "(manifest: read 1, kept 1 documents)" in msg
    assert "lower data.seq_len" in msg and "\n" not in msg
