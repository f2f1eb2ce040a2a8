"""A staged mixture under a batch warmup, run as a user runs it (DeepSpeed launcher, 2 CPU ranks, fp32): the same
losses and gradient norms as the plain-PyTorch oracle; killed and resumed from a checkpoint inside the ramp, bit for
bit across the stage switch; resumed on 1 rank, the switch at the same step and sample; extended from a stable-phase
checkpoint with an anneal stage on a dataset added after; a changed stage already run is refused. Each source's val
loss is logged (eval.per_source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.config import load_recipe
from llmforge.data.prepare import prepare
from llmforge.train.oracle import oracle_steps
from tests.helpers import REPO, ds_cmd, losses_after_last_start, rows, run_cli, train_rows, write_recipe

pytestmark = pytest.mark.distributed

STAGES = [
    {"name": "stable", "steps": 8, "weights": {"early": 3, "late": 1}},
    {"name": "anneal", "weights": {"late": 1}, "lr_decay": True},
]


def stage_recipe(tmp: Path, data: Path, name: str, datasets=("early", "late"), stages=STAGES) -> Path:
    """Three text sources from the stdlib corpus (by file name), prepared under tmp; the run reads `datasets`."""
    corpus, prepared = data / "corpus", tmp / "prepared"
    return write_recipe(
        tmp / f"{name}.yaml",
        data,
        tmp / "runs",
        run={"name": name},
        data={
            "sources": [
                {"name": "early", "type": "text", "paths": [str(corpus / "[_a-f]*.txt")]},
                {"name": "late", "type": "text", "paths": [str(corpus / "[g-o]*.txt")]},
                {"name": "extra", "type": "text", "paths": [str(corpus / "[p-z]*.txt")]},
            ],
            "prepared_dir": str(prepared),
            "datasets": [{"path": str(prepared / n)} for n in datasets],
            "stages": stages,
        },
        train={
            "max_steps": 12,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "batch_warmup": {"start": 4, "tokens": 16 * 64},  # 4 sequences a step until sample 16, then 8
            "schedule": "wsd",
        },
        checkpoint={"interval": 3, "keep_last": 10},
        eval={"per_source": True},
        deepspeed={"config": str(REPO / "ds_configs" / "zero1.json")},
    )


def step_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in train_rows(run_dir)}


def stage_events(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows(run_dir) if r.get("event") == "stage"]


def test_staged_mixture_with_batch_warmup(tmp_path, prepared):
    data = prepared  # its corpus/ and char tokenizer; the three sources are prepared here
    recipe = stage_recipe(tmp_path, data, "a")
    prepare(load_recipe(str(recipe)), str(recipe), progress=False)
    runs = tmp_path / "runs"
    r = run_cli(*ds_cmd(recipe))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = step_rows(runs / "a")
    assert [a[s]["batch"] for s in range(1, 13)] == [4, 4, 4, 4] + [8] * 8
    events = stage_events(runs / "a")
    assert [(e["step"], e["stage"], e["first_sample"], e["weights"]) for e in events] == [
        (1, "stable", 0, {"early": 3.0, "late": 1.0}),
        (9, "anneal", 48, {"late": 1.0}),
    ]
    # tokens per source: 3:1 over the stable stage's 48 samples, then only `late`
    assert (a[8]["tokens.early"], a[8]["tokens.late"]) == (36 * 64, 12 * 64)
    assert (a[12]["tokens.early"], a[12]["tokens.late"]) == (36 * 64, 44 * 64)
    assert a[12]["tokens"] == 80 * 64
    state = json.loads((runs / "a" / "checkpoints" / "step_00000012" / "llmforge_state.json").read_text())
    assert state["source_tokens"] == {"early": 36 * 64, "late": 44 * 64}
    assert a[12]["lr"] == pytest.approx(3e-4) and a[9]["lr"] == pytest.approx(3e-3 - (3e-3 - 3e-4) / 4)
    evals = [r for r in rows(runs / "a") if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert all(0 < e["val_loss.early"] != e["val_loss.late"] > 0 for e in evals)  # each source's own val split

    # An independent reference: plain PyTorch, the same ramp and stages (DeepSpeed scales each micro-batch by the
    # step's own accumulation: a wrong scale shows in the gradient norm).
    oracle = oracle_steps(load_recipe(str(recipe)), str(recipe), 12, 8, 2)
    for s in range(1, 13):
        assert abs(a[s]["loss"] - oracle.losses[s]) <= 2e-6 * oracle.losses[s], s
        assert abs(a[s]["grad_norm"] - oracle.grad_norms[s]) <= 1e-5 * oracle.grad_norms[s], s

    # Killed (a rank dies saving step 6) and resumed with --resume auto from step 3, inside the ramp: bit for bit
    # through the stage switch.
    r = run_cli(*ds_cmd(recipe, "--set", "run.name=b"), env={"LLMFORGE_FAULTS": "die_in_save@6"})
    assert r.returncode != 0
    r = run_cli(*ds_cmd(recipe, "--set", "run.name=b", "--resume", "auto"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["step"] for x in rows(runs / "b") if x.get("event") == "resumed"] == [3]
    after = losses_after_last_start(runs / "b")
    assert sorted(after) == list(range(4, 13))
    assert all(after[s] == a[s]["loss"] for s in after), after
    assert stage_events(runs / "b") == events  # the first run opened the stable stage, the resumed one the anneal

    point = runs / "a" / "checkpoints"

    # Resumed on 1 rank at step 6: the switch at the same step and sample, the same losses up to summation order.
    r = run_cli(*ds_cmd(recipe, "--set", "run.name=c", "--resume", str(point / "step_00000006"), ranks=1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = step_rows(runs / "c")
    assert stage_events(runs / "c") == events[1:]
    for s in range(7, 13):
        assert abs(c[s]["loss"] - a[s]["loss"]) <= 1e-6 * a[s]["loss"], s
        assert (c[s]["tokens.early"], c[s]["tokens.late"]) == (a[s]["tokens.early"], a[s]["tokens.late"])

    # Extended from the stable phase (step 6) with an anneal on a dataset the run never read: the samples read so
    # far are the same, so the resume is taken although the datasets changed.
    anneal = {"name": "anneal", "weights": {"late": 1, "extra": 1}, "lr_decay": True}
    extended = stage_recipe(tmp_path, data, "d", ("early", "late", "extra"), [STAGES[0] | {"steps": 6}, anneal])
    r = run_cli(*ds_cmd(extended, "--set", "train.max_steps=10", "--resume", str(point / "step_00000006"), ranks=1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = step_rows(runs / "d")
    assert sorted(d) == list(range(7, 11))
    assert [(e["step"], e["stage"], e["weights"]) for e in stage_events(runs / "d")] == [
        (7, "anneal", {"late": 1.0, "extra": 1.0})
    ]
    assert d[10]["tokens.early"] == a[6]["tokens.early"] and d[10]["tokens.extra"] == 16 * 64
    assert d[10]["lr"] == pytest.approx(3e-4)
    changed = next(r for r in rows(runs / "d") if r.get("event") == "schedule_changed")
    assert changed["lr"][1] == d[7]["lr"] == pytest.approx(3e-3 - (3e-3 - 3e-4) / 4)  # decaying over the anneal

    # A stage already run, changed: refused before anything starts, in one line.
    changed = stage_recipe(tmp_path, data, "e", stages=[STAGES[0] | {"weights": {"early": 1, "late": 1}}, STAGES[1]])
    r = run_cli(*ds_cmd(changed, "--resume", str(point / "step_00000006"), ranks=1))
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "read its first 32 samples as [from sample 0: early 0.75, late 0.25]" in r.stderr
    assert "early 0.5, late 0.5" in r.stderr and "Traceback" not in r.stderr
