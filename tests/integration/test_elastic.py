"""Elastic resume through DeepSpeed universal checkpoints: 2 ranks → 1 and 1 → 2 (with a ZeRO stage change), the
same global sample sequence, continuous loss, and the optimizer step count kept (DeepSpeed #5211/#5289/#6691)."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.helpers import REPO, ds_cmd, rows, run_cli, write_recipe

pytestmark = pytest.mark.distributed


def train_rows(run_dir):
    all_rows = rows(run_dir)
    start = max([i for i, r in enumerate(all_rows) if r.get("event") == "resumed"], default=-1)
    return {r["step"]: r for r in all_rows[start + 1 :] if "loss" in r and "event" not in r}


def adam_steps(ckpt) -> set[float]:
    steps = set()
    for f in ckpt.glob("*optim_states.pt"):
        base = torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        state = base["state"] if isinstance(base, dict) else base[0]["state"]
        steps |= {float(v["step"]) for v in state.values()}
    return steps


def test_resume_at_another_world_size_and_stage(tmp_path, prepared):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 16, "warmup_steps": 2},
        checkpoint={"interval": 8, "keep_last": 5},
        eval={"interval": 0},
    )
    runs = tmp_path / "runs"
    # A: 2 ranks, ZeRO-2, micro 4 → global batch 8.   B: resume A's step 8 on 1 rank: the checkpoint's global
    # batch is kept, accumulation 2 derived (nothing set by hand).
    assert run_cli(*ds_cmd(recipe, "--set", "run.name=a")).returncode == 0
    r = run_cli(
        sys.executable,
        "launch/pretrain.py",
        "--recipe",
        str(recipe),
        "--set",
        "run.name=b",
        "--resume",
        str(runs / "a/checkpoints/step_00000008"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (resumed,) = [x for x in rows(runs / "b") if x.get("event") == "resumed"]
    assert resumed["changed"] == {"world_size": [2, 1], "grad_accum_steps": [1, 2]}
    # C: 1 rank from scratch (accum 2).   D: resume C's step 8 on 2 ranks under ZeRO-1.
    assert (
        run_cli(
            sys.executable,
            "launch/pretrain.py",
            "--recipe",
            str(recipe),
            "--set",
            "run.name=c",
            "--set",
            "train.grad_accum_steps=2",
        ).returncode
        == 0
    )
    r = run_cli(
        *ds_cmd(
            recipe,
            "--set",
            "run.name=d",
            "--set",
            f"deepspeed.config={REPO}/ds_configs/zero1.json",
            "--resume",
            str(runs / "c/checkpoints/step_00000008"),
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]

    for base, resumed, worlds in (("a", "b", (2, 1)), ("c", "d", (1, 2))):
        (event,) = [x for x in rows(runs / resumed) if x.get("event") == "elastic_resume"]
        assert (event["from_world"], event["to_world"]) == worlds
        want, got = train_rows(runs / base), train_rows(runs / resumed)
        assert sorted(got) == list(range(9, 17))
        for step in got:
            assert got[step]["tokens"] == want[step]["tokens"]  # the same global sample sequence
            assert abs(got[step]["loss"] - want[step]["loss"]) < 2e-3, (step, got[step]["loss"], want[step]["loss"])
        assert adam_steps(runs / resumed / "checkpoints/step_00000016") == {16.0}


def test_stage3_crossing_is_a_one_line_error(tmp_path, prepared):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 4, "warmup_steps": 1},
        checkpoint={"interval": 4},
        eval={"interval": 0},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe)).returncode == 0
    r = run_cli(
        sys.executable,
        "launch/pretrain.py",
        "--recipe",
        str(recipe),
        "--set",
        "train.max_steps=8",
        "--set",
        f"deepspeed.config={REPO}/ds_configs/zero3.json",
    )
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("checkpoint error:") and "ZeRO-0" in line and "ZeRO-3" in line
