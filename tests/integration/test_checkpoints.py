"""Checkpoint commit and --resume semantics, on real single-process DeepSpeed runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmforge.errors import CheckpointError
from llmforge.train.checkpoint import resolve_resume
from llmforge.train.checkpoint_files import newest_complete, verify
from llmforge.train.metrics import read_metrics
from tests.helpers import REPO, rows, run_cli, write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prepared) -> Path:
    """A 12-step single-process run with checkpoints at 4, 8, 12 (ZeRO-0, bf16). The spike guard's loss window (the
    only state that grows, up to its bounded length) is full by step 4, so later checkpoints have equal sizes."""
    tmp = tmp_path_factory.mktemp("ckpt")
    recipe = write_recipe(
        tmp / "r.yaml",
        prepared,
        tmp / "runs",
        eval={"interval": 0},
        train={"spike_guard": {"window": 4, "min_history": 2}},
        checkpoint={"interval": 4, "keep_last": 2},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    r = run_cli("python", "launch/pretrain.py", "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_commit_layout_pointer_and_pruning(finished_run):
    ckpts = finished_run / "runs" / "t" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000012"
    steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000008", "step_00000012"]  # keep_last: 2
    for step in steps:
        d = ckpts / step
        assert not (d.parent / "latest").read_text().startswith("global_step")
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["step"] == int(step[5:])
        for rel, meta in manifest["files"].items():
            assert (d / rel).stat().st_size == meta["size"] and len(meta["sha256"]) == 64
        state = json.loads((d / "llmforge_state.json").read_text())
        assert state["consumed_samples"] == state["step"] * 4 and state["world_size"] == 1
        assert (d / "rng_rank00000.pt").exists() and (d / "tokenizer.json").exists()
    assert verify(str(ckpts / "step_00000012")) is None
    # Resume work does not grow with the step: the same bytes are read at any step (checkpoints do not grow), and
    # no data is replayed (the position is one counter mapped in O(1): test_loader_order_is_seeded_and_restorable).
    sizes = []
    for step in steps:
        files = json.loads((ckpts / step / "manifest.json").read_text())["files"]
        sizes.append({k: v["size"] for k, v in files.items() if k.endswith(".pt")})
    assert sizes[0] == sizes[1] and sizes[0]


def test_incomplete_checkpoint_is_skipped_by_auto_and_refused_by_path(finished_run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "runs" / "t" / "checkpoints", ckpts)
    (ckpts / "step_00000012" / "manifest.json").unlink()  # as if killed mid-save
    assert newest_complete(str(ckpts)) == str(ckpts / "step_00000008")
    assert resolve_resume("auto", str(ckpts)).path == str(ckpts / "step_00000008")
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(ckpts / "step_00000012"), str(ckpts))
    shard = next((ckpts / "step_00000008").glob("*model_states.pt"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # one flipped byte: same size, different content
    shard.write_bytes(bytes(data))
    assert "is corrupted (sha256" in verify(str(ckpts / "step_00000008"))
    with pytest.raises(CheckpointError, match=f"{shard}.*corrupted"):
        newest_complete(str(ckpts))  # committed but damaged: an error naming the file, not older weights
    with pytest.raises(CheckpointError, match="no intact older checkpoint"):
        resolve_resume("auto", str(ckpts))  # damaged and nothing older: never a silent fresh start
    shard.write_bytes(bytes(data[:-10]))
    assert "manifest says" in verify(str(ckpts / "step_00000008"))
    shard.write_bytes(bytes(data))
    (ckpts / "step_00000008" / "rng_rank00000.pt").unlink()
    assert verify(str(ckpts / "step_00000008"), checksums=False).endswith("rng_rank00000.pt is missing")
    assert resolve_resume("none", str(ckpts)).path is None


def test_auto_resume_falls_back_past_a_damaged_checkpoint(finished_run, tmp_path):
    """A requeued job under --resume auto goes on from the newest intact checkpoint and logs resume_fallback; the
    damaged one is set aside for inspection (training past its step does not overwrite it); an explicit --resume
    PATH to it is still an error."""
    run = tmp_path / "runs" / "t"
    shutil.copytree(finished_run / "runs" / "t", run)
    ckpts = run / "checkpoints"
    newest = ckpts / "step_00000012"
    shard = next(newest.glob("*model_states.pt"))
    damaged_bytes = shard.read_bytes()[:-10]
    shard.write_bytes(damaged_bytes)  # shorter than its manifest says
    point = resolve_resume("auto", str(ckpts))
    assert point.path == str(ckpts / "step_00000008")
    assert point.damaged == [(str(newest), point.damaged[0][1])] and "manifest says" in point.damaged[0][1]
    base = [
        "python",
        "launch/pretrain.py",
        "--recipe",
        str(finished_run / "r.yaml"),
        "--set",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    r = run_cli(*base, "--resume", str(newest))
    assert r.returncode == 2 and "manifest says" in r.stderr.strip().splitlines()[-1]
    r = run_cli(*base, "--resume", "auto", "--set", "train.max_steps=14")
    assert r.returncode == 0, r.stderr[-2000:]
    events = [row for row in read_metrics(str(run)) if row.get("event") in ("resume_fallback", "resumed")]
    assert events[-2]["event"] == "resume_fallback" and "manifest says" in events[-2]["damaged"]
    assert events[-2]["moved_to"] == f"{newest}.damaged" and events[-1]["event"] == "resumed"
    assert events[-1]["step"] == 8
    assert next((ckpts / "step_00000012.damaged").glob("*model_states.pt")).read_bytes() == damaged_bytes
    assert verify(str(newest)) is None and verify(str(ckpts / "step_00000014")) is None


def test_resume_path_errors_are_one_line(finished_run, tmp_path):
    recipe = finished_run / "r.yaml"
    for bad, fragment in [(tmp_path / "missing", "no such checkpoint"), (tmp_path, "not a checkpoint")]:
        r = run_cli("python", "launch/pretrain.py", "--recipe", str(recipe), "--resume", str(bad))
        assert r.returncode == 2, r.stderr[-2000:]
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("checkpoint error: --resume") and fragment in line


def test_resume_auto_from_finished_run_and_from_explicit_path(finished_run, tmp_path):
    run = finished_run / "runs" / "t"
    before = run.joinpath("metrics.jsonl").read_text().splitlines()
    r = run_cli(
        "python",
        "launch/pretrain.py",
        "--recipe",
        str(finished_run / "r.yaml"),
        "--set",
        "train.max_steps=14",
        "--resume",
        str(run / "checkpoints" / "step_00000008"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    new = rows(run)[len(before) :]
    # a longer run re-derives the cosine schedule: said with before/after, as is every quantity that changed
    schedule, resumed = new[0], new[1]
    assert schedule["event"] == "schedule_changed" and schedule["max_steps"] == [12, 14]
    first_run = {r["step"]: r for r in map(json.loads, before) if "loss" in r}
    assert schedule["lr"][0] == pytest.approx(first_run[9]["lr"]) and schedule["lr"][1] > schedule["lr"][0]
    assert resumed["event"] == "resumed" and resumed["step"] == 8 and resumed["changed"] == {"max_steps": [12, 14]}
    assert [x["step"] for x in new if "loss" in x] == list(range(9, 15))
    assert next(x for x in new if "loss" in x)["lr"] == pytest.approx(schedule["lr"][1])
    # the resumed model is the trained one: its first loss is near the first run's step 8-9, not its step 1
    loss = next(x for x in new if "loss" in x)["loss"]
    assert abs(loss - first_run[9]["loss"]) < abs(loss - first_run[1]["loss"]) / 4
