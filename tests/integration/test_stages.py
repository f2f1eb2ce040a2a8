"""A staged mixture under a batch warmup, run as a user runs it (DeepSpeed launcher, 2 CPU ranks, fp32): killed
while saving and resumed from a checkpoint inside the ramp, bit for bit across the end of the ramp and the stage
switch; the same losses and gradient norms as the plain-PyTorch oracle; extended on 1 rank from a stable-phase
checkpoint with an anneal stage on a dataset added after, the switch on the right sample; a changed stage already run
refused. Each source's val loss is logged (eval.per_source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.config import load_recipe
from llmforge.config.parallel import Layout, resolve_batch
from llmforge.data.prepare import prepare
from llmforge.data.stages import batch_ramp
from llmforge.errors import CheckpointError
from llmforge.tokenizer import fingerprint
from llmforge.train.checkpoint import ResumePoint, check_resume
from llmforge.train.oracle import oracle_steps
from llmforge.train.task import Task
from tests.helpers import REPO, ds_cmd, losses_after_last_start, rows, run_cli, train_rows, write_recipe

pytestmark = pytest.mark.distributed

STAGES = [
    {"name": "stable", "steps": 5, "weights": {"early": 3, "late": 1}},
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

    # Killed (a rank dies saving step 6) and resumed with --resume auto from step 3, inside the ramp: steps 4-6 (the
    # first full batch at 5, the stage switch at 6) bit for bit, then on to step 12.
    r = run_cli(*ds_cmd(recipe), env={"LLMFORGE_FAULTS": "die_in_save@6"})
    assert r.returncode != 0
    first = {x["step"]: x["loss"] for x in train_rows(runs / "a")}
    assert sorted(first) == list(range(1, 7))
    r = run_cli(*ds_cmd(recipe, "--resume", "auto"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["step"] for x in rows(runs / "a") if x.get("event") == "resumed"] == [3]
    after = losses_after_last_start(runs / "a")
    assert sorted(after) == list(range(4, 13))
    assert all(after[s] == first[s] for s in (4, 5, 6)), (after, first)
    a = step_rows(runs / "a")  # steps 1-3 of the first run, 4-12 of the resumed one

    assert [a[s]["batch"] for s in range(1, 13)] == [4, 4, 4, 4] + [8] * 8
    # the stable stage opened by the first run, the anneal by both (each ran step 6)
    assert [(e["step"], e["stage"], e["first_sample"], e["weights"]) for e in stage_events(runs / "a")] == [
        (1, "stable", 0, {"early": 3.0, "late": 1.0}),
        (6, "anneal", 24, {"late": 1.0}),
        (6, "anneal", 24, {"late": 1.0}),
    ]
    # tokens per source: 3:1 over the stable stage's 24 samples, then only `late`
    assert (a[5]["tokens.early"], a[5]["tokens.late"]) == (18 * 64, 6 * 64)
    assert (a[12]["tokens.early"], a[12]["tokens.late"]) == (18 * 64, 62 * 64)
    assert a[12]["tokens"] == 80 * 64
    state = json.loads((runs / "a" / "checkpoints" / "step_00000012" / "llmforge_state.json").read_text())
    assert state["source_tokens"] == {"early": 18 * 64, "late": 62 * 64}
    assert a[5]["lr"] == 3e-3 and a[6]["lr"] == pytest.approx(3e-3 - (3e-3 - 3e-4) / 7)  # decaying over the anneal
    assert a[12]["lr"] == pytest.approx(3e-4)
    evals = [r for r in rows(runs / "a") if "val_loss" in r]
    assert evals and all(0 < e["val_loss.early"] != e["val_loss.late"] > 0 for e in evals)  # each source's own

    # An independent reference: plain PyTorch, the same ramp and stages (DeepSpeed scales each micro-batch by the
    # step's own accumulation: a wrong scale shows in the gradient norm).
    oracle = oracle_steps(load_recipe(str(recipe)), str(recipe), 12, 8, 2)
    for s in range(1, 13):
        assert abs(a[s]["loss"] - oracle.losses[s]) <= 2e-6 * oracle.losses[s], s
        assert abs(a[s]["grad_norm"] - oracle.grad_norms[s]) <= 1e-5 * oracle.grad_norms[s], s

    # Extended from the stable phase (step 3) on 1 rank, with an anneal on a dataset the run never read: the samples
    # read so far are the same, so the resume is taken although the datasets changed; the switch lands on sample 12.
    point = runs / "a" / "checkpoints" / "step_00000003"
    anneal = {"name": "anneal", "weights": {"late": 1, "extra": 1}, "lr_decay": True}
    extended = stage_recipe(tmp_path, data, "d", ("early", "late", "extra"), [STAGES[0] | {"steps": 3}, anneal])
    r = run_cli(*ds_cmd(extended, "--set", "train.max_steps=7", "--resume", str(point), ranks=1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = step_rows(runs / "d")
    assert sorted(d) == list(range(4, 8)) and [d[s]["batch"] for s in range(4, 8)] == [4, 8, 8, 8]
    assert [(e["step"], e["stage"], e["first_sample"], e["weights"]) for e in stage_events(runs / "d")] == [
        (4, "anneal", 12, {"late": 1.0, "extra": 1.0})
    ]
    # samples 12-40 at 1:1; early as the run left it at step 3
    assert (d[7]["tokens.early"], d[7]["tokens.late"], d[7]["tokens.extra"]) == (9 * 64, 17 * 64, 14 * 64)
    assert a[3]["tokens.early"] == 9 * 64 and d[7]["lr"] == pytest.approx(3e-4)
    changed = next(r for r in rows(runs / "d") if r.get("event") == "schedule_changed")
    assert changed["lr"][1] == d[4]["lr"] == pytest.approx(3e-3 - (3e-3 - 3e-4) / 4)

    # A stage already run, changed: refused before the engine, naming both orders.
    path = stage_recipe(tmp_path, data, "e", stages=[STAGES[0] | {"weights": {"early": 1, "late": 1}}, STAGES[1]])
    changed_recipe = resolve_batch(load_recipe(str(path)), 1, str(path))
    task = Task()
    setup = task.setup(changed_recipe, str(path), ResumePoint(None), 1)
    order = task.schedule_data(setup.recipe, setup.data, batch_ramp(setup.recipe.train, 64, 1), str(path))
    with pytest.raises(CheckpointError) as refused:
        check_resume(
            ResumePoint(str(point)), fingerprint(setup.tokenizer), setup.data.train.fingerprint, False, Layout(1), 1,
            order,
        )  # fmt: skip
    assert "read its first 12 samples as [from sample 0: early 0.75, late 0.25]" in str(refused.value)
    assert "as [from sample 0: early 0.5, late 0.5]" in str(refused.value)
