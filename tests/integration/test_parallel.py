"""Parallel layouts run: the sequence-parallel model on 2 forked gloo ranks against the same model on one rank
(DeepSpeed's comm layer JIT-builds its CPU op, a subprocess), `llmforge parity` over the tensor, sequence and
combined layouts, a layout made wrong on purpose, kill-and-resume under layouts, and bad layouts refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist

from llmforge.config import load_recipe
from llmforge.config.parallel import Layout
from llmforge.config.recipe import ModelConfig
from llmforge.data.loader import PretrainData
from llmforge.data.prepare import prepare
from llmforge.model import GPT
from llmforge.model.gpt import document_ids
from llmforge.model.parallel import SequenceSlice, apply_sequence_parallel
from llmforge.parity import parse_layouts
from llmforge.train.distributed import setup_env
from llmforge.train.guard import FaultInjector
from llmforge.train.loading import load_model
from tests.helpers import REPO, ds_cmd, losses_after_last_start, rows, run_cli, run_distributed, write_recipe

CFG = dict(vocab_size=61, max_seq_len=32, d_model=32, n_layers=2, n_heads=4)


def _samples(masked: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inputs, targets and forward kwargs; masked: documents ending with EOS (token 0) at 5, 14 and 20, so one
    document crosses the two sequence ranks' slices, attended within documents."""
    g = torch.Generator().manual_seed(1)
    inputs, targets = torch.randint(1, 61, (3, 32), generator=g), torch.randint(0, 61, (3, 32), generator=g)
    targets[0, :20] = -100  # rank 0's slice holds fewer counted targets than rank 1's
    if not masked:
        return inputs, targets, {}
    inputs[:, [5, 14, 20]] = 0
    return inputs, targets, {"documents": document_ids(inputs, 0)}


def _sequence_parallel_step(position: str, kv: int, masked: bool = False) -> tuple[float, dict]:
    """One forward/backward of a 2-rank sequence group, each rank on its half of the same samples: the loss it
    backpropagates (sequence x its share) and its gradients averaged over the group, as DeepSpeed does."""
    setup_env()  # the per-environment extension cache the launched runs use
    deepspeed.init_distributed(dist_backend="gloo")  # DistributedAttention talks through deepspeed.comm
    layout = Layout(2, sequence=2, rank=dist.get_rank())
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG, position=position, n_kv_heads=kv))
    apply_sequence_parallel(model, layout.process_groups().sequence)
    inputs, targets, masked_kwargs = _samples(masked)
    piece = SequenceSlice(layout)
    x, y, kwargs = piece(inputs, targets)
    _, loss = model(x, y, **kwargs, **masked_kwargs)  # documents of the whole sequences
    (loss * piece.scale).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for t in grads.values():
        dist.all_reduce(t)
        t /= 2  # DeepSpeed's mean over its data-parallel group, which holds the sequence ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total), {n: t.numpy() for n, t in grads.items()}  # plain arrays: the result crosses processes


@pytest.mark.parametrize(
    "position, kv, masked", [("rope", 2, False), ("learned", 2, False), ("rope", 1, False), ("rope", 2, True)]
)
def test_sequence_parallel_loss_and_gradients_equal_one_rank(position, kv, masked):
    """kv=1: one key/value head for 2 sequence ranks, repeated before the all-to-all. masked: document-masked
    attention, the mask applied after the all-to-all (each rank then holds whole sequences of its heads)."""
    results = run_distributed(_sequence_parallel_step, position, kv, masked, start="spawn")
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG, position=position, n_kv_heads=kv))
    inputs, targets, kwargs = _samples(masked)
    _, loss = model(inputs, targets, **kwargs)
    loss.backward()
    for total, grads in results:
        # the mean over every counted target of the whole sequences, not the mean of the two slices' means
        assert abs(total - float(loss)) < 1e-5
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.from_numpy(grads[name]), p.grad, rtol=1e-4, atol=1e-6)


def parity_recipe(tmp_path: Path, prepared: Path, **train) -> Path:
    """The test recipe with 8 query and 4 key/value heads: every layout below holds whole heads."""
    return write_recipe(
        tmp_path / "parity.yaml",
        prepared,
        tmp_path / "runs",
        model={"d_model": 32, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4},
        train={"precision": "fp32", "warmup_steps": 1, **train},
        deepspeed={"config": str(REPO / "ds_configs" / "zero1.json")},
    )


@pytest.mark.distributed
def test_parity_passes_for_the_combined_tensor_and_sequence_layout(tmp_path, prepared):
    """tp2.sp2 on 4 ranks (the combination DeepSpeed #8316 reports broken with DeepSpeed's own Ulysses groups)
    against the plain-PyTorch oracle.
    tp2 alone is held to one rank by test_export_gathers_tensor_shards, sp2 alone by the gradient test above and the
    planted-fault test below; the 20-step table of every layout is in bench/results."""
    recipe = parity_recipe(tmp_path, prepared)
    out = tmp_path / "parity"
    r = run_cli(
        "llmforge", "parity", "--recipe", str(recipe), "--variants", "tp2.sp2", "--steps", "3",
        "--out", str(out), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "parity.json").read_text())
    assert report["reference"] == "oracle"  # plain PyTorch on one process: no launch to wait for
    by_name = {row["layout"]: row for row in report["layouts"]}
    assert list(by_name) == ["oracle", "tp2.sp2"]
    row = by_name["tp2.sp2"]
    assert row["precision"] == "fp32" and row["tolerances"] == [2e-6, 2e-5]
    assert row["passed"] and row["max_loss_rel_diff"] <= 2e-6 and row["max_grad_norm_rel_diff"] <= 2e-5, row
    assert sorted(row["losses"]) == ["1", "2", "3"]
    assert next(x for x in r.stdout.splitlines() if x.startswith("tp2.sp2 ")).endswith("pass"), r.stdout


@pytest.mark.distributed
def test_document_masking_keeps_parity_under_every_layout(tmp_path, prepared):
    """model.attention_mask: document on real stdlib text cut into documents of at most 40 characters (so nearly every
    64-token window packs several): dp2, tp2 and sp2 each against the plain-PyTorch oracle (which masks by the same
    EOS), in fp32."""
    data = tmp_path / "data"
    (data / "prepared").mkdir(parents=True)
    shutil.copytree(prepared / "corpus", data / "corpus")
    shutil.copy(prepared / "prepared" / "tokenizer.json", data / "prepared" / "tokenizer.json")
    recipe = write_recipe(
        tmp_path / "masked.yaml",
        data,
        tmp_path / "runs",
        data={"chunk_chars": 40, "min_chars": 1},
        model={"d_model": 32, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "attention_mask": "document"},
        train={"precision": "fp32", "warmup_steps": 1},
        deepspeed={"config": str(REPO / "ds_configs" / "zero1.json")},
    )
    prepare(load_recipe(str(recipe)), str(recipe), progress=False)
    train = PretrainData(load_recipe(str(recipe)).data.dataset_dirs(), 64, 7, "train")
    windows = train.batch(list(range(8)))[0]
    assert all((w == 1).sum() >= 1 for w in windows)  # EOS (the char tokenizer's 1) in every window: masking acts
    out = tmp_path / "parity"
    r = run_cli(
        "llmforge", "parity", "--recipe", str(recipe), "--variants", "dp2,tp2,sp2", "--steps", "3", "--one-launch",
        "--out", str(out), timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "parity.json").read_text())
    rows = {row["layout"]: row for row in report["layouts"]}
    assert report["reference"] == "oracle" and list(rows) == ["oracle", "dp2", "tp2", "sp2"]
    for name in ("dp2", "tp2", "sp2"):
        assert rows[name]["passed"] and rows[name]["max_loss_rel_diff"] <= 2e-6, rows[name]


@pytest.mark.distributed
def test_parity_fails_a_layout_that_computes_another_model(tmp_path, prepared):
    """A sequence group whose gradients are averaged instead of summed (a planted missing reduction): the model
    differs from step 1 on and parity says so (exit 1)."""
    recipe = parity_recipe(tmp_path, prepared)
    r = run_cli(
        "llmforge", "parity", "--recipe", str(recipe), "--layouts", "1,sp2", "--steps", "3", timeout=600,
        env={FaultInjector.ENV: "unsummed_sequence"},
    )  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("sp2 "))
    assert line.endswith("FAIL"), r.stdout


class _MisplacedExperts(Layout):
    """A layout whose expert-group table is wrong on purpose (each rank alone), as a DeepSpeed release that ordered
    its expert groups otherwise would leave it."""

    def expert_groups(self) -> list[list[int]]:
        return [[r] for r in range(self.world)]


def _engine_groups() -> tuple[dict, str]:
    """Build an expert-parallel engine through train/engine.py on 2 ranks (ep2, ZeRO-1): the ranks of the groups it
    adopted, and the error of the same check against a layout planted wrong."""
    from llmforge.config.parallel import ProcessGroups
    from llmforge.config.recipe import MoEConfig, TrainConfig
    from llmforge.train.engine import build_engine

    setup_env()
    deepspeed.init_distributed(dist_backend="gloo")
    layout = Layout(dist.get_world_size(), rank=dist.get_rank(), expert=2)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG, moe=MoEConfig(num_experts=4, d_ff=16)))
    adamw = {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}  # as on CPU runs: no op to JIT-build
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "optimizer": adamw}
    built = build_engine(model, ds, layout, TrainConfig())
    g = built.groups
    ranks = {dim: dist.get_process_group_ranks(getattr(g, dim)) for dim in ("data", "expert", "expert_data")}
    planted = _MisplacedExperts(layout.world, rank=layout.rank, expert=2)
    try:
        ProcessGroups(planted).adopt_deepspeed(built.engine)
    except RuntimeError as e:
        return ranks, str(e)
    return ranks, ""


@pytest.mark.distributed
def test_the_engine_adopts_deepspeeds_groups_only_when_they_are_the_layouts():
    results = run_distributed(_engine_groups, start="spawn")
    for rank, (ranks, planted) in enumerate(results):
        assert sorted(ranks["expert"]) == sorted(ranks["data"]) == [0, 1] and ranks["expert_data"] == [rank]
        assert planted.startswith(f"rank {rank}: DeepSpeed's expert group holds ranks [0, 1], the layout's [{rank}]")


@pytest.mark.distributed
# each layout under one ZeRO stage (the layouts' own code does not depend on the stage; ZeRO-1 and ZeRO-2 resume at
# 2 ranks in test_zero_resume)
@pytest.mark.parametrize("layout, stage", [("tp2.dp2", 1), ("sp2.dp2", 2)])
def test_resume_under_a_layout_is_bit_exact(tmp_path, prepared, layout, stage):
    """4 ranks; a run resumed from the step-3 checkpoint of another reproduces steps 4-6 bit for bit."""
    spec = parse_layouts(layout)[0].layout
    sets = [x for s in spec.recipe_sets() for x in ("--set", s)]
    base = write_recipe(
        tmp_path / "base.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": "base"},
        model={"d_model": 32, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4},
        train={"max_steps": 6, "warmup_steps": 1},
        checkpoint={"interval": 3, "keep_last": 5},
        eval={"interval": 0},
        deepspeed={"config": str(REPO / "ds_configs" / f"zero{stage}.json")},
    )
    r = run_cli(*ds_cmd(base, *sets, ranks=4), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    baseline = losses_after_last_start(tmp_path / "runs" / "base")
    last = [x for x in rows(tmp_path / "runs" / "base") if x.get("step") == 6 and "loss" in x][-1]
    assert last["tokens"] == 6 * 8 * 64  # steps x (micro-batch 4 x 2 replicas) x seq_len: each replica counted once
    step3 = tmp_path / "runs" / "base" / "checkpoints" / "step_00000003"
    assert sorted(baseline) == list(range(1, 7)) and step3.is_dir()
    state = json.loads((step3 / "llmforge_state.json").read_text())
    assert {k: state[k] for k in spec.identity()} == spec.identity()  # the layout's own record of itself
    assert state["global_batch"] == 4 * 2  # micro-batch 4 x 2 data-parallel replicas

    r = run_cli(*ds_cmd(base, *sets, "--set", "run.name=resumed", "--resume", str(step3), ranks=4), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = losses_after_last_start(tmp_path / "runs" / "resumed")
    assert sorted(after) == [4, 5, 6]
    for step, loss in after.items():
        assert loss == baseline[step], (step, loss, baseline[step])  # bit for bit

    if spec.tensor > 1:  # a tensor-parallel checkpoint does not move to another tensor size
        moved = ("--set", "run.name=moved", "--resume", str(step3))
        r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(base), *moved)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        assert "was saved with parallel.tensor=2; resuming it under tensor=1 is not supported" in r.stdout + r.stderr


@pytest.mark.distributed
def test_export_gathers_tensor_shards(tmp_path, prepared):
    """A tp2 run's checkpoint holds each column/row-parallel weight as 2 shards; loading (generate, evaluate,
    export) gathers them: the weights equal a 1-rank run's of the same recipe (fp32), and the exported
    LlamaForCausalLM's logits equal llmforge's within 1e-4."""
    from transformers import LlamaForCausalLM

    recipe = parity_recipe(tmp_path, prepared, max_steps=3)
    sets = ("--set", "eval.interval=0")
    r = run_cli(*ds_cmd(recipe, *sets, "--set", "parallel.tensor=2", "--set", "run.name=tp2"), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe), *sets, "--set", "run.name=one")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    step = tmp_path / "runs" / "tp2" / "checkpoints" / "step_00000003"
    shards = [torch.load(step / f"mp_rank_0{i}_model_states.pt", weights_only=True)["module"] for i in (0, 1)]
    assert shards[0]["blocks.0.attn.wq.weight"].shape == (16, 32)  # half of the 8 heads x 4 dims
    assert shards[0]["blocks.0.mlp.down.weight"].shape == (32, shards[0]["blocks.0.mlp.up.weight"].shape[0])
    assert shards[0]["tok_emb.weight"].shape == shards[1]["tok_emb.weight"].shape  # replicated

    tp2, tok, _ = load_model(str(tmp_path / "runs" / "tp2"))
    one, _, _ = load_model(str(tmp_path / "runs" / "one"))
    for (name, a), b in zip(tp2.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    r = run_cli(
        sys.executable, "launch/export_hf.py", "--checkpoint", str(tmp_path / "runs" / "tp2"), "--out",
        str(tmp_path / "hf"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(Path(__file__).read_text()[:64])])
    with torch.no_grad():
        ours, _ = one(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
