"""The prepare pipeline end to end on small real corpora: near-duplicates across workers, decontamination, sharded
preparation equal to one worker, restart skipping complete parts, sentencepiece, and shards megatron-core reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llmforge.config.data import DatasetSpec
from llmforge.data.indexed import IndexedDataset
from llmforge.data.loader import PretrainData
from llmforge.data.prepare import prepare, train_tokenizer
from llmforge.errors import DataError
from llmforge.tokenizer import load_tokenizer
from tests.helpers import WORDS, corpus, recipe_for


def shards_digest(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {name: meta["sha256"] for name, meta in manifest["files"].items()}


def decoded_texts(directory: Path, tok) -> list[str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    texts = []
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            ds = IndexedDataset(str(directory / shard["prefix"]))
            texts += [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))]
    return texts


def test_dedup_across_workers_and_sharded_equals_single(tmp_path):
    planted = corpus(tmp_path / "raw")
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "one")
    train_tokenizer(recipe, origin)
    tok = load_tokenizer(recipe.tokenizer, origin)
    m = prepare(recipe, origin, progress=False)["web"]
    st = m["stats"]
    assert st["read"] == planted["total"]
    assert st["dropped:exact_duplicate"] == 1 and st["dropped:near_duplicate"] == 1
    assert st["kept"] == planted["total"] - 2 == m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    # token counts named for what they count: the parts' before dedup, the shards' (what training reads) after
    assert not any(k.startswith("tokens:") for k in st)
    shards = sum(m["splits"][s]["tokens"] for s in ("train", "val"))
    assert st["tokens_before_dedup:train"] + st.get("tokens_before_dedup:val", 0) > shards > 0
    texts = decoded_texts(tmp_path / "one" / "web", tok)
    assert planted["original"] in texts and planted["near"] not in texts
    assert len(set(texts)) == len(texts)

    # Two slurm-array-style shards, then a merge: the same dataset, byte for byte.
    recipe2, origin2 = recipe_for(tmp_path, tmp_path / "raw", "two")
    assert prepare(recipe2, origin2, shard_index=0, num_shards=2, progress=False) == {}
    with pytest.raises(Exception, match="parts are not prepared yet"):
        prepare(recipe2, origin2, shard_index=0, num_shards=1, progress=False, only_merge=True)
    prepare(recipe2, origin2, shard_index=1, num_shards=2, progress=False)
    prepare(recipe2, origin2, shard_index=0, num_shards=1, progress=False, only_merge=True)
    assert shards_digest(tmp_path / "two" / "web") == shards_digest(tmp_path / "one" / "web")

    # Two worker processes on one node: the same again.
    recipe3, origin3 = recipe_for(tmp_path, tmp_path / "raw", "workers")
    prepare(recipe3, origin3, workers=2, progress=False)
    assert shards_digest(tmp_path / "workers" / "web") == shards_digest(tmp_path / "one" / "web")


def test_rerun_skips_complete_parts(tmp_path):
    corpus(tmp_path / "raw", per_file=8)
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out")
    train_tokenizer(recipe, origin)
    prepare(recipe, origin, progress=False)
    parts = sorted((tmp_path / "out" / "web" / "parts").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    victim = parts[1]
    victim.unlink()  # as if that worker was killed before finishing its part
    prepare(recipe, origin, progress=False)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in parts if p != victim)
    assert victim.exists()


def test_decontamination_drops_documents_sharing_long_ngrams(tmp_path):
    planted = corpus(tmp_path / "raw", per_file=8)
    words = planted["original"].split()
    bench = tmp_path / "eval.jsonl"
    bench.write_text(json.dumps({"question": "Q: " + " ".join(words[10:30]) + "?", "answer": "B"}) + "\n")
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out", decontaminate={"paths": [str(bench)], "ngram": 13})
    train_tokenizer(recipe, origin)
    st = prepare(recipe, origin, progress=False)["web"]["stats"]
    # the original and its exact copy contain the 20-word span; the near-duplicate has a changed word at 17
    assert st["dropped:contaminated"] >= 2
    tok = load_tokenizer(recipe.tokenizer, origin)
    assert all(" ".join(words[10:23]).lower() not in t.lower() for t in decoded_texts(tmp_path / "out" / "web", tok))


def test_sentencepiece_end_to_end_and_megatron_reads_the_shards(tmp_path):
    corpus(tmp_path / "raw", per_file=15)
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out")
    from dataclasses import replace

    recipe = replace(
        recipe,
        tokenizer=replace(recipe.tokenizer, type="sentencepiece", vocab_size=400, path=str(tmp_path / "sp.model")),
    )
    tok = train_tokenizer(recipe, origin)
    assert tok.vocab_size == 400
    sample = "The river market opened. 42 lanterns!\n\tdone"
    assert tok.decode(tok.encode(sample)) == sample  # byte fallback + whitespace kept
    m = prepare(recipe, origin, progress=False)["web"]
    assert m["tokenizer"]["type"] == "sentencepiece" and m["dtype"] == "uint16"
    data = PretrainData(
        [DatasetSpec(str(tmp_path / "out" / "web"))], 64, seed=0, tokenizer_fingerprint=m["tokenizer"]["fingerprint"]
    )
    x, y = data.batch(range(4))
    assert x.shape == (4, 64) and int(x.max()) < 400

    megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    shard = m["splits"]["train"]["shards"][0]["prefix"]
    ours = IndexedDataset(str(tmp_path / "out" / "web" / shard))
    theirs = megatron.IndexedDataset(str(tmp_path / "out" / "web" / shard))
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        assert theirs[i].tolist() == ours[i].tolist()
    assert theirs[0][-1] == tok.eos_id
    digest = hashlib.sha256((tmp_path / "out" / "web" / f"{shard}.bin").read_bytes()).hexdigest()
    assert m["files"][f"{shard}.bin"]["sha256"] == digest


def test_local_hf_tokenizer_directory(tmp_path):
    from dataclasses import replace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    planted = corpus(tmp_path / "raw", per_file=8)
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        [planted["original"]] * 3 + [" ".join(WORDS)],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    directory = tmp_path / "hf-tok"
    directory.mkdir()
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out")
    recipe = replace(recipe, tokenizer=replace(recipe.tokenizer, type="hf", path=str(directory)))
    tok = load_tokenizer(recipe.tokenizer, origin)
    assert tok.eos_id == hf.token_to_id("</s>") and tok.pad_id == hf.token_to_id("<pad>")
    m = prepare(recipe, origin, progress=False)["web"]
    assert m["tokenizer"]["type"] == "hf" and m["stats"]["kept"] == 6 * 8 - 2
    texts = decoded_texts(tmp_path / "out" / "web", tok)
    assert planted["original"] in texts


def test_empty_and_huge_documents_are_dropped_and_counted(tmp_path):
    planted = corpus(tmp_path / "raw", per_file=8)
    with open(tmp_path / "raw" / "part9.jsonl", "w") as f:
        f.write(json.dumps({"text": "   \n\t  "}) + "\n")
        f.write(json.dumps({"text": planted["original"] * 40}) + "\n")
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out", max_chars=20_000)
    train_tokenizer(recipe, origin)
    st = prepare(recipe, origin, progress=False)["web"]["stats"]
    assert st["dropped:empty"] == 1 and st["dropped:too_long"] == 1
    assert st["read"] == st["kept"] + sum(v for k, v in st.items() if k.startswith("dropped:"))


def test_changed_settings_redo_parts(tmp_path):
    corpus(tmp_path / "raw", per_file=8)
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out")
    train_tokenizer(recipe, origin)
    first = prepare(recipe, origin, progress=False)["web"]
    from dataclasses import replace

    stricter = replace(recipe, data=replace(recipe.data, web_filters=replace(recipe.data.web_filters, min_words=10**6)))
    with pytest.raises(DataError, match=r"web\] kept no documents: .* too_few_words \(data.web_filters\)"):
        prepare(stricter, origin, progress=False)
    m = json.loads((Path(recipe.data.prepared_dir) / "web" / "manifest.json").read_text())
    assert m["stats"]["kept"] == 0 and m["stats"]["dropped:too_few_words"] == first["stats"]["read"]
