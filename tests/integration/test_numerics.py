"""Every DeepSpeed path llmforge ships, held to an independent reference: `llmforge parity --variants` runs each
shipped ZeRO config x fp32/bf16 x accumulation 1/2 on 2 ranks against the plain-PyTorch fp32 oracle; a planted
dropped micro-batch fails it; the bug classes DeepSpeed has shipped (a parameter used twice in one backward, the
last micro-batch of an accumulation, ZeRO-3's partitioned parameters) on the configurations llmforge runs."""

from __future__ import annotations

import json
import math
import re
import sys

import deepspeed
import numpy as np
import pytest
import torch
import torch.distributed as dist

from llmforge.config.recipe import ModelConfig
from llmforge.model import GPT
from llmforge.train.distributed import setup_env
from llmforge.train.engine import param_groups
from llmforge.train.guard import FaultInjector
from tests.helpers import REPO, run_cli, run_distributed, train_rows, write_recipe
from tests.helpers import rows as rows_of

ZERO = ("z0", "z1", "z2", "z3", "z3off")
MATRIX = [f"{z}.{p}.acc{a}.dp2" for z in ZERO for p in ("fp32", "bf16") for a in (1, 2)]
# the MoE block's experts split over the 2 ranks (DeepSpeed AutoEP), under each ZeRO stage it runs with
EXPERT = ["ep2.z1.fp32.acc2", "ep2.z2.bf16.acc1", "ep2.z3.fp32.acc1", "tp2.z1.fp32.acc2"]  # tp2: experts whole per rank


# One MoE block (4 experts, top 2) and one dense block: every variant checks both MLP kinds against the oracle.
MIXED = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "moe": {"num_experts": 4, "layers": [0]}}


def _recipe(tmp_path, prepared, model=None, **train):
    return write_recipe(
        tmp_path / "numerics.yaml",
        prepared,
        tmp_path / "runs",
        train={"warmup_steps": 1, **train},
        deepspeed={"config": str(REPO / "ds_configs" / "zero2.json")},
        **({"model": model} if model else {}),
    )


@pytest.mark.distributed
def test_every_shipped_zero_config_trains_the_oracle_model(tmp_path, prepared):
    """24 variants, a model with an MoE block and a dense one (the experts split over the ranks in 3 variants,
    the attention in tp2, a launch of its own), the others in one 2-rank launch: fp32 within 2e-6 of the oracle,
    bf16 within 2e-3, ZeRO-0 with bf16 refused in one line. The MoE block's balance loss is a statistic of each
    micro-batch, so accumulation 2 (micro-batch 2) is held to an oracle over the same micro-batches; against the
    micro-batch-4 oracle it was 3.2e-5 off in loss. ZeRO-3 without weight decay, the llmforge defect this found,
    fails it: with the fix reverted the ZeRO-3 and ZeRO-3-offload fp32 rows were 5.5e-6 to 5.6e-6 off by step 4
    (its bf16 rows are not sharp enough to see it)."""
    out = tmp_path / "parity"
    variants = ",".join(MATRIX + EXPERT)
    r = run_cli(
        "llmforge", "parity", "--recipe", str(_recipe(tmp_path, prepared, MIXED)), "--variants", variants,
        "--steps", "4", "--one-launch", "--out", str(out), timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    report = json.loads((out / "parity.json").read_text())
    assert report["reference"] == "oracle"
    rows = {row["variant"]: row for row in report["layouts"]}
    assert list(rows) == ["oracle", *MATRIX, *EXPERT]
    for name in MATRIX + EXPERT:
        row = rows[name]
        if name.startswith("z0.bf16"):
            assert row["refused"] and "zero1.json" in row["refused"] and row["losses"] == {}, row
            continue
        assert row["passed"] and row["error"] is None and sorted(row["losses"]) == ["1", "2", "3", "4"], row
        assert (
            row["max_loss_rel_diff"] <= row["tolerances"][0] and row["max_grad_norm_rel_diff"] <= row["tolerances"][1]
        )
        assert row["tolerances"] == ([2e-6, 2e-5] if ".fp32." in name else [2e-3, 2e-2]), row
        assert all(g is not None and g > 0 for g in row["grad_norms"].values()), row  # every stage logs a norm
    # bf16 really ran in bf16: it is further from the fp32 oracle than fp32 is
    assert min(rows[n]["max_loss_rel_diff"] for n in MATRIX if ".bf16." in n and not n.startswith("z0")) > 1e-5
    # never silent: a line per refused variant, a bar of the launch's steps (18 variants x 4), the oracle's line
    progress = re.split(r"[\r\n]", r.stderr)
    assert sum(line.startswith("z0.bf16.acc") and ": refused: " in line for line in progress) == 2
    bars = [line for line in progress if line.startswith("21 variants (2 ranks):")]
    assert len(set(bars)) >= 3 and "84/84" in bars[-1], r.stderr[-3000:]
    assert {x for x in progress if x.startswith("oracle:")} == {
        f"oracle: 4 plain-PyTorch fp32 steps (micro-batch {m})" for m in (2, 4)
    }
    # Each run ends with a checkpoint. ZeRO-3 with experts split over the ranks stores them partitioned, which
    # zero_to_fp32 cannot gather: read through DeepSpeed's universal form, the weights are those of ZeRO-3 without
    # expert parallelism after the same 4 steps.
    from llmforge.train.loading import load_model

    split = load_model(str(out / "parity-ep2.z3.fp32.acc1"))[0].state_dict()
    whole = load_model(str(out / "parity-z3.fp32.acc1.dp2"))[0].state_dict()
    assert split.keys() == whole.keys() and "blocks.0.moe.experts.w1" in split
    assert max(float((split[k] - whole[k]).abs().max()) for k in split) < 1e-5


@pytest.mark.distributed
def test_planted_gradient_losses_fail_parity(tmp_path, prepared):
    """4 ranks, one launch, two planted faults on. "dropped_micro" drops the last micro-batch's gradients and still
    counts its loss (DeepSpeed #7985's class): the logged losses stay plausible, the oracle shows the model differs
    (z2.fp32.acc2.dp4). "lost_expert_grads" keeps the expert gradients of one expert-data-parallel rank only (a
    missing reduction across the experts' data-parallel group): ep2.dp4 (experts over 2 ranks, 2 copies of each)
    fails; ep4 (every expert on one rank: nothing to reduce) and dp4 (no expert parallelism, no accumulation) pass,
    so all-to-all over 4 ranks trains the oracle's model and each fault is what parity sees."""
    variants = {"z2.fp32.acc2.dp4": "FAIL", "ep2.dp4": "FAIL", "ep4": "pass", "dp4": "pass"}
    r = run_cli(
        "llmforge", "parity", "--recipe", str(_recipe(tmp_path, prepared, MIXED)), "--variants", ",".join(variants),
        "--steps", "3", "--one-launch", timeout=600, env={FaultInjector.ENV: "dropped_micro,lost_expert_grads"},
    )  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {x.split()[0]: x.split()[-1] for x in r.stdout.splitlines() if x.split()[:1] and x.split()[0] in variants}
    assert rows == variants, r.stdout


def test_zero0_fp32_logs_a_gradient_norm_and_skips_a_step_with_nan_gradients(tmp_path, prepared):
    """ZeRO-0 in fp32 hands gradients to the bare optimizer: DeepSpeed reports no norm there and applies NaN
    gradients. The trainer computes the norm itself and skips the step."""
    recipe = write_recipe(
        tmp_path / "z0.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 6, "warmup_steps": 1},
        deepspeed={"config": str(REPO / "ds_configs" / "zero0.json")},
        checkpoint={"interval": 0},
        eval={"interval": 0},
    )
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe), env={FaultInjector.ENV: "nan@3"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = train_rows(tmp_path / "runs" / "t")
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]
    norms = {x["step"]: x["grad_norm"] for x in rows}
    assert norms[3] is None and all(norms[s] is not None and math.isfinite(norms[s]) for s in (1, 2, 4, 5, 6))
    assert all(x["loss"] is not None and math.isfinite(x["loss"]) for x in rows if x["step"] != 3)
    assert any(e.get("event") == "skipped_step" and e["step"] == 3 for e in rows_of(tmp_path / "runs" / "t"))


CFG = dict(vocab_size=61, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
STEPS, GLOBAL, MICRO = 3, 8, 2


def _shared_block_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG))
    model.blocks[1] = model.blocks[0]  # one block applied twice in every forward (and a tied embedding/head)
    return model


def _samples(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 61, (GLOBAL, 33), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _deepspeed_shared_block(stage: int) -> np.ndarray:
    """ZeRO-`stage` bf16, 2 ranks x accumulation 2 x micro-batch 2: the flat fp32-cast weights after 3 steps."""
    setup_env()
    deepspeed.init_distributed(dist_backend="gloo")
    model = _shared_block_model()
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "train_batch_size": GLOBAL,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    rank = dist.get_rank()
    for step in range(STEPS):
        inputs, targets = _samples(step)
        for micro in range(2):
            rows = slice((micro * 2 + rank) * MICRO, (micro * 2 + rank + 1) * MICRO)  # micro_batch_indices' order
            _, loss = engine(inputs[rows], targets[rows])
            engine.backward(loss)
            engine.step()
    return torch.cat([p.detach().float().flatten() for p in engine.module.parameters()]).numpy()


class _NoGradientCopy(torch.nn.Module):
    """Applies `block` with its weights detached: the output carries gradient to the input, none to the weights."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = [block]  # in a list: not a submodule, so its parameters are not counted twice

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        block = self.block[0]
        detached = {n: p.detach() for n, p in block.named_parameters()}
        return torch.func.functional_call(block, detached, (x, *args))


def _reference_update(detach_second_use: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain fp32 PyTorch over the same samples: (initial, final) flat weights. detach_second_use: a model whose
    second application of the shared block contributes no gradient (what a lost contribution would train)."""
    model = _shared_block_model()
    if detach_second_use:
        model.blocks[1] = _NoGradientCopy(model.blocks[0])
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(STEPS):
        inputs, targets = _samples(step)
        opt.zero_grad()
        for micro in range(GLOBAL // MICRO):
            _, loss = model(inputs[micro * MICRO : (micro + 1) * MICRO], targets[micro * MICRO : (micro + 1) * MICRO])
            (loss / (GLOBAL // MICRO)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return start, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("stage", [1, 2])
def test_a_parameter_used_twice_in_one_backward_under_zero_bf16_with_accumulation(stage):
    """DeepSpeed #8224's class (ZeRO-2 + bf16, a parameter whose gradient arrives twice in one backward): the
    update DeepSpeed applies points where plain PyTorch's does (cosine > 0.99 over 3 steps), while losing the
    shared block's second contribution would not (cosine < 0.95: the check can see it)."""
    start, true_end = _reference_update(False)
    _, lost_end = _reference_update(True)
    ds_end = [torch.from_numpy(w) for w in run_distributed(_deepspeed_shared_block, stage, start="spawn")]
    assert torch.equal(ds_end[0], ds_end[1])  # both ranks hold the same weights

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a - start, b - start, dim=0))

    assert cos(ds_end[0], true_end) > 0.99, cos(ds_end[0], true_end)
    assert cos(lost_end, true_end) < 0.95, cos(lost_end, true_end)


@pytest.mark.distributed
def test_the_optimizer_bench_compares_muon_with_adamw(tmp_path, prepared):
    """bench/optimizers.py --quick: AdamW and Muon (ZeRO-2, 2 ranks), launched as users launch them."""
    out = tmp_path / "optimizers.md"
    r = run_cli(
        sys.executable, "bench/optimizers.py", "--quick", "--recipe", str(_recipe(tmp_path, prepared)),
        "--out", str(out), timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert {"adamw", "muon lr 0.02, grad_clip 0"} <= set(table), table
    tail = {k: float(v.rstrip(" |").rsplit("|", 1)[1]) for k, v in table.items() if k != "run"}
    assert tail["muon lr 0.02, grad_clip 0"] != tail["adamw"]  # another optimizer really ran


def test_fp8_stays_within_two_percent_of_bf16_under_every_zero_stage(tmp_path, prepared):
    """120 steps of tensorwise FP8 under ZeRO 1, 2 and 3 against bf16 (one rank, one launch). The first 20 steps are
    held to the oracle with FP8's per-step tolerance; after that the runs drift apart step by step (parity's per-step
    check is not meant for 120 steps, so its exit code is not the check here) and the mean training loss of the last
    40 steps is compared with bf16's: measured at 300 steps, tensorwise +0.6% to +1.1% (docs/training.md); a 2% bound
    leaves room for another CPU's rounding. FP8 ran: its losses are not bf16's. Rowwise scaling: the unit test of the
    conversion and the 20- and 300-step tables in bench/results."""
    out = tmp_path / "parity"
    variants = "z1.bf16,z1.bf16.fp8,z2.bf16.fp8,z3.bf16.fp8"
    r = run_cli(
        "llmforge", "parity", "--recipe", str(_recipe(tmp_path, prepared)), "--variants", variants,
        "--steps", "120", "--one-launch", "--out", str(out), timeout=1200,
    )  # fmt: skip
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((out / "parity.json").read_text())["layouts"]}
    oracle = rows.pop("oracle")

    def tail_mean(row: dict) -> float:
        return sum(row["losses"][str(s)] for s in range(81, 121)) / 40

    bf16 = tail_mean(rows["z1.bf16"])
    for name, row in rows.items():
        assert row["error"] is None and len(row["losses"]) == 120, (name, row["error"])
        first = max(abs(row["losses"][str(s)] / oracle["losses"][str(s)] - 1) for s in range(1, 21))
        assert first <= row["tolerances"][0], (name, first)
        if name != "z1.bf16":
            assert row["precision"] == "bf16+fp8" and row["tolerances"] == [3e-3, 5e-2]
            assert abs(tail_mean(row) / bf16 - 1) <= 0.02, (name, tail_mean(row), bf16)
            assert row["losses"] != rows["z1.bf16"]["losses"], name
