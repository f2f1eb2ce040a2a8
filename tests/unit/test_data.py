import json
import os
import shutil
import struct

import numpy as np
import pytest

from llmforge.config import load_recipe
from llmforge.config.data import DatasetSpec
from llmforge.data.indexed import HEADER, IndexedDataset, IndexedDatasetWriter
from llmforge.data.loader import BlendedOrder, PretrainData, micro_batch_indices
from llmforge.data.prepare import train_tokenizer
from llmforge.errors import DataError
from llmforge.tokenizer import CharTokenizer
from tests.helpers import write_recipe


def test_indexed_dataset_roundtrip_in_megatron_layout(tmp_path):
    docs = [np.arange(5), np.arange(3) + 100, np.array([7]), np.arange(1000) % 50]
    w = IndexedDatasetWriter(str(tmp_path / "d"), np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    assert not list(tmp_path.glob("*.tmp"))
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == HEADER
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, n_seq, n_doc) == (1, 8, 4, 5)  # dtype code 8 = uint16, doc_idx has n+1 entries
    lengths = np.frombuffer(raw, np.int32, 4, 34)
    pointers = np.frombuffer(raw, np.int64, 4, 34 + 16)
    assert lengths.tolist() == [5, 3, 1, 1000] and pointers.tolist() == [0, 10, 16, 18]
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 4 and ds.num_tokens == 1009
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.tolist()
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]


def test_char_tokenizer_roundtrip_and_unknown():
    tok = CharTokenizer.train(["hello world", "abc"], vocab_size=3 + 5)
    assert tok.vocab_size == 8
    text = "hello"
    assert tok.decode(tok.encode(text)).replace("\ufffd", "?").count("?") == sum(c not in tok.chars for c in text)
    full = CharTokenizer.train(["def f(x):\n    return x\n"])
    assert full.decode(full.encode("def f(x):")) == "def f(x):"


def test_prepare_writes_manifest_and_splits_by_document(tmp_path, prepared):
    out = prepared / "prepared" / "stdlib"
    manifest = json.loads((out / "manifest.json").read_text())
    s = manifest["splits"]
    assert s["train"]["documents"] > 0 and s["val"]["documents"] > 0
    n_files = len(list((prepared / "corpus").glob("*.txt")))
    assert manifest["stats"]["read"] == n_files
    dropped = sum(v for k, v in manifest["stats"].items() if k.startswith("dropped:"))
    assert s["train"]["documents"] + s["val"]["documents"] == manifest["stats"]["kept"] == n_files - dropped
    for name, meta in manifest["files"].items():
        assert os.path.getsize(out / name) == meta["size"]
    (shard,) = s["train"]["shards"]
    train = IndexedDataset(str(out / shard["prefix"]))
    assert train.num_tokens == s["train"]["tokens"] == shard["tokens"]
    eos = manifest["tokenizer"]["eos_id"]
    assert all(train[i][-1] == eos for i in range(len(train)))  # EOS closes every document


def test_loader_rank_slices_are_disjoint_and_cover_the_global_batch(prepared):
    data = PretrainData([DatasetSpec(str(prepared / "prepared" / "stdlib"))], 64, seed=3)
    world, mb, accum = 4, 3, 2
    step_consumed = 5 * world * mb * accum
    seen = []
    for micro in range(accum):
        for rank in range(world):
            seen.extend(micro_batch_indices(step_consumed, micro, rank, world, mb))
    assert sorted(seen) == list(range(step_consumed, step_consumed + world * mb * accum))
    windows = [data.order.locate(g) for g in seen]
    assert len(set(windows)) == len(windows)  # no two ranks train on the same sample in a step


def test_loader_order_is_seeded_and_restorable_in_o1(prepared):
    spec = [DatasetSpec(str(prepared / "prepared" / "stdlib"))]
    a, b, c = (PretrainData(spec, 64, seed=s) for s in (3, 3, 4))
    idx = range(40, 44)
    xa, ya = a.batch(idx)
    xb, yb = b.batch(idx)
    assert xa.equal(xb) and ya.equal(yb)
    assert not xa.equal(c.batch(idx)[0])
    assert xa[:, 1:].equal(ya[:, :-1])  # targets are inputs shifted by one
    # an epoch is a permutation: every window exactly once
    n = a.num_samples
    assert sorted(a.order.locate(g)[1] for g in range(n)) == list(range(n))
    assert [a.order.locate(g)[1] for g in range(n, n + 20)] != [a.order.locate(g)[1] for g in range(20)]
    # a position far in the future (many epochs) is computed directly, not by iterating
    far = 10**12 + 17
    x, _ = a.batch(range(far, far + 2))
    epoch, j = divmod(far, n)
    assert x[0].tolist() == a.windows[0][a.order.permutation(0, epoch)(j)][:-1].tolist()


def test_blend_follows_weights(tmp_path, prepared):
    other = tmp_path / "copy"
    shutil.copytree(prepared / "prepared" / "stdlib", other)
    data = PretrainData(
        [DatasetSpec(str(prepared / "prepared" / "stdlib"), 3.0), DatasetSpec(str(other), 1.0)], 64, seed=1
    )
    picks = [data.order.locate(g)[0] for g in range(4000)]
    assert picks.count(0) == 3000 and picks.count(1) == 1000
    assert max(len(s) for s in "".join(map(str, picks[:400])).split("0")) <= 1  # spread, not in runs


def test_blended_order_positions_are_unique_within_an_epoch():
    order = BlendedOrder([7, 5], [1.0, 1.0], seed=0)
    got = [order.locate(g) for g in range(10)]
    assert len(set(got)) == 10


def test_tokenizer_fingerprint_mismatch_is_refused(tmp_path, prepared):
    with pytest.raises(DataError, match="re-run launch/prepare_data.py"):
        PretrainData([DatasetSpec(str(prepared / "prepared" / "stdlib"))], 64, 0, tokenizer_fingerprint="0" * 16)


def test_unprepared_dataset_and_empty_glob(tmp_path, prepared):
    with pytest.raises(DataError, match="no manifest.json"):
        PretrainData([DatasetSpec(str(tmp_path))], 64, 0)
    path = write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "runs")
    recipe = load_recipe(str(path))
    with pytest.raises(DataError, match="matches no files"):
        list(train_tokenizer(recipe, str(path)))


def test_truncated_or_missing_shard_is_a_one_line_error(tmp_path, prepared):
    copy = tmp_path / "ds"
    shutil.copytree(prepared / "prepared" / "stdlib", copy)
    (copy / "train-00000.idx").write_bytes((copy / "train-00000.idx").read_bytes()[:-8])
    with pytest.raises(DataError, match=r"train-00000.idx: \d+ bytes, the manifest says \d+"):
        PretrainData([DatasetSpec(str(copy))], 64, 0)
    (copy / "train-00000.bin").unlink()
    with pytest.raises(DataError, match=r"train-00000.bin: missing"):
        PretrainData([DatasetSpec(str(copy))], 64, 0)


def test_feistel_permutation_is_a_bijection():
    from llmforge.data.loader import FeistelPermutation

    for n in (1, 2, 3, 17, 1000, 4097):
        p = FeistelPermutation(n, key=5)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    a, b = FeistelPermutation(1000, 1), FeistelPermutation(1000, 2)
    assert [a(i) for i in range(20)] != [b(i) for i in range(20)]
    assert sum(a(i) == i for i in range(1000)) < 20  # actually shuffled


def test_ten_thousand_shards_and_a_10b_token_blend_in_constant_memory(tmp_path):
    """Opening a dataset of 10,000 shard files reads no index file; a 10B-token blend samples without any
    per-sample array (RSS stays flat)."""
    import time

    import psutil

    from llmforge.data.indexed import IndexedDatasetWriter

    many = tmp_path / "many"
    many.mkdir()
    shards, files = [], {}
    for i in range(10_000):
        prefix = f"train-{i:05d}"
        w = IndexedDatasetWriter(str(many / prefix), np.uint16)
        w.add_document(np.arange(i % 7, i % 7 + 130) % 100)
        w.finalize()
        shards.append({"prefix": prefix, "documents": 1, "tokens": 130})
    files = {p.name: {"size": p.stat().st_size, "sha256": "-"} for p in many.iterdir()}
    split = {"documents": 10_000, "tokens": 1_300_000, "shards": shards}
    manifest = {
        "tokenizer": {"fingerprint": "x"},
        "dtype": "uint16",
        "files": files,
        "splits": {"train": split, "val": {"documents": 0, "tokens": 0, "shards": []}},
    }
    (many / "manifest.json").write_text(json.dumps(manifest))
    started = time.time()
    data = PretrainData([DatasetSpec(str(many))], 64, seed=0)
    assert time.time() - started < 30  # seconds, not minutes (measured: well under 1 s)
    assert data.num_samples == 10_000 * 2
    x, _ = data.batch(range(5000, 5032))
    assert x.shape == (32, 64)

    # 10B tokens in 5 sparse shard files (no disk used), blended with the small dataset.
    big = tmp_path / "big"
    big.mkdir()
    shards, files = [], {}
    for i in range(5):
        prefix = f"train-{i:05d}"
        n = 2_000_000_000
        with open(big / f"{prefix}.bin", "wb") as f:
            f.truncate(n * 2)
        index = HEADER + struct.pack("<QBQQiqqq", 1, 8, 1, 2, n, 0, 0, 1)  # one uint16 document of n tokens
        (big / f"{prefix}.idx").write_bytes(index)
        files[f"{prefix}.bin"] = {"size": n * 2, "sha256": "-"}
        files[f"{prefix}.idx"] = {"size": len(index), "sha256": "-"}
        shards.append({"prefix": prefix, "documents": 1, "tokens": n})
    manifest["files"], manifest["splits"]["train"] = files, {"documents": 5, "tokens": 10**10, "shards": shards}
    (big / "manifest.json").write_text(json.dumps(manifest))
    rss = psutil.Process().memory_info().rss
    blend = PretrainData([DatasetSpec(str(big), 0.7), DatasetSpec(str(many), 0.3)], 64, seed=1)
    assert blend.num_samples > 150_000_000
    picks = [blend.order.locate(g)[0] for g in range(20_000)]
    assert abs(picks.count(0) / len(picks) - 0.7) < 0.02  # blend within 2% of the weights
    for g in range(0, 10**9, 10**7):  # positions far apart, many epochs of the small dataset
        blend.batch(range(g, g + 1))
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20


def _overwrite(path, offset: int, data: bytes) -> None:
    """Bytes overwritten in place: the file keeps its size (what a size check cannot see)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_shard_overwritten_in_place_is_caught_at_open_when_small_and_at_read_otherwise(tmp_path, prepared):
    from llmforge.data.verify import verify_dataset
    from llmforge.errors import CorruptSampleError

    copy = tmp_path / "ds"
    shutil.copytree(prepared / "prepared" / "stdlib", copy)
    assert verify_dataset(str(copy)) == []
    bin_path = copy / "train-00000.bin"
    _overwrite(bin_path, 2 * 5000, b"\xff\xff" * 4)  # token 5000 onwards: id 65535, far outside the vocabulary
    with pytest.raises(DataError, match=r"train-00000.bin: its sha256 differs from the manifest's"):
        PretrainData([DatasetSpec(str(copy))], 64, 0, verify_mb=256)
    data = PretrainData([DatasetSpec(str(copy))], 64, 0, verify_mb=0)  # a large dataset: not hashed at open
    idx = IndexedDataset(str(copy / "train-00000"))
    document = int(np.searchsorted(np.cumsum(idx.lengths), 5000, side="right"))
    with pytest.raises(CorruptSampleError) as e:
        for start in range(0, data.num_samples, 64):
            data.batch(range(start, min(start + 64, data.num_samples)))
    assert str(e.value).startswith(
        f"{copy}/train-00000.bin: token id 65535 at document {document}, token 5000 is outside the vocabulary of "
    )
    data.defer_errors = True  # the trainer's way: the window reads as zeros, the problem is kept for the all-reduce
    window = data.windows[0][5000 // 64]
    assert not window.any() and data.problem == str(e.value)
    problems = verify_dataset(str(copy))
    assert problems[0] == f"{bin_path}: sha256 differs from the manifest's"
    assert problems[1] == (
        f"{bin_path}: token id 65535 at token 5000 (document {document}) is outside the "
        f"vocabulary of {json.loads((copy / 'manifest.json').read_text())['tokenizer']['vocab_size']}"
    )


def test_an_index_with_a_garbage_header_is_refused_at_open(tmp_path, prepared):
    copy = tmp_path / "ds"
    shutil.copytree(prepared / "prepared" / "stdlib", copy)
    _overwrite(copy / "train-00000.idx", 0, b"GARBAGE!!")
    with pytest.raises(DataError, match=r"train-00000.idx: not an indexed-dataset index \(no MMIDIDX header\)"):
        PretrainData([DatasetSpec(str(copy))], 64, 0, verify_mb=0)
    shutil.copy(prepared / "prepared" / "stdlib" / "train-00000.idx", copy / "train-00000.idx")
    _overwrite(copy / "train-00000.idx", len(HEADER) + 9, struct.pack("<Q", 3))  # 3 documents, the file holds more
    with pytest.raises(DataError, match=r"train-00000.idx: the header's 3 sequences / \d+ documents do not match"):
        PretrainData([DatasetSpec(str(copy))], 64, 0, verify_mb=0)


def test_a_val_split_smaller_than_one_evaluation_is_a_warning(tmp_path, prepared):
    from llmforge.train.run import val_warning

    path = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs", eval={"interval": 5, "batches": 2})
    recipe = load_recipe(str(path))
    val = PretrainData(recipe.data.dataset_dirs(), recipe.data.seq_len, 1, "val")
    per_eval = 2 * recipe.train.micro_batch_size * 2
    assert 0 < per_eval < val.num_samples and val_warning(recipe, val, 2) is None
    batches = val.num_samples // recipe.train.micro_batch_size  # one replica reads the whole split: two read it twice
    recipe = load_recipe(str(path), [f"eval.batches={batches}"])
    assert val_warning(recipe, val, 1) is None
    assert val_warning(recipe, val, 2) == (
        f"the val split holds {val.num_samples} samples of data.seq_len+1 tokens, and each evaluation reads "
        f"eval.batches x train.micro_batch_size x 2 data-parallel replicas = {2 * batches * 4}: it repeats samples; "
        f"raise data.val_fraction (and prepare again) or lower eval.batches"
    )
    assert val_warning(load_recipe(str(path), [f"eval.batches={batches}", "eval.interval=0"]), val, 2) is None
