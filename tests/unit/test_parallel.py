"""Parallel layouts in-process: rank placement, the layout checks, batch keys, the parity command's layout names and
the tensor-shard merge. The layouts themselves run in tests/integration/test_parallel.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmforge.config import load_recipe
from llmforge.config.deepspeed import compose_ds_config
from llmforge.config.parallel import Layout, check_layout, make_layout, resolve_batch
from llmforge.config.recipe import ModelConfig, ParallelConfig, Recipe, TrainConfig
from llmforge.errors import RecipeError, UserError
from llmforge.model import GPT
from llmforge.model.parallel import (
    merge_tensor_shards,
    tensor_shard_dim,
)
from llmforge.parity import parse_layouts
from llmforge.train.guard import FaultInjector
from tests.helpers import REPO, write_recipe


def test_tensor_groups_are_consecutive_ranks_then_sequence_then_data():
    lay = [Layout(8, tensor=2, sequence=2, rank=r) for r in range(8)]
    assert [(x.data_rank, x.sequence_rank, x.tensor_rank) for x in lay] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (0, 1, 1),
        (1, 0, 0),
        (1, 0, 1),
        (1, 1, 0),
        (1, 1, 1),
    ]
    assert lay[0].data == 2
    assert lay[0].sequence_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]  # orthogonal to the tensor pairs
    assert [x.counts_tokens for x in lay] == [True, False, False, False, True, False, False, False]


@pytest.mark.parametrize("world,tensor,expert", [(8, 1, 2), (8, 1, 4), (16, 1, 8), (8, 2, 1), (16, 4, 1), (4, 1, 1)])
def test_layout_groups_are_deepspeeds(world, tensor, expert):
    """The layout's rank tables against DeepSpeed's own derivations (functions that build no process group):
    AutoTP's tensor and data groups, AutoEP's expert and expert-data groups. The runtime check after every engine
    build (ProcessGroups.adopt_deepspeed) compares the groups DeepSpeed then made with the same tables."""
    from deepspeed.module_inject.auto_ep_folding import ParallelFoldingSpec, expected_folding_group_tables
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    lay = Layout(world, tensor=tensor, expert=expert)
    spec = ParallelFoldingSpec(world, 1, world, tensor, world // tensor, expert, 1, world // expert, "tp")
    tables = expected_folding_group_tables(spec)
    assert lay.tensor_groups() == [list(g) for g in tables.tp_groups]
    assert lay.data_groups() == [list(g) for g in tables.dense_dp_groups]
    ep, edp = _get_expert_parallel_ranks(world, tensor, expert)
    assert lay.expert_groups() == ep and lay.expert_data_groups() == edp
    if tensor == 1:
        assert lay.expert_groups() == [list(g) for g in tables.ep_groups]
    # every rank's groups partition the ranks, and the sizes are the dimensions'
    for dim, size in (("tensor", tensor), ("data", world // tensor), ("expert", expert)):
        table = lay.groups()[dim]
        assert sorted(r for g in table for r in g) == list(range(world)) and {len(g) for g in table} == {size}


def test_layout_checkpoint_identity_round_trips():
    lay = Layout(8, tensor=2, sequence=2, rank=5)
    assert Layout.from_identity(lay.identity(), Layout(1)) == dataclasses.replace(lay, rank=0)
    assert Layout.from_identity({}, Layout(4)) == Layout(4)  # an old checkpoint that recorded only what it had
    assert lay.zero == 4 and Layout(8, expert=2).zero == 8


def _recipe(**parallel) -> Recipe:
    r = Recipe(
        model=ModelConfig(d_model=64, n_heads=8, n_kv_heads=4, n_layers=2),
        train=TrainConfig(micro_batch_size=2, grad_accum_steps=3, warmup_steps=1),
        parallel=ParallelConfig(**parallel),
    )
    r.data.seq_len = 64
    r.deepspeed.config = str(REPO / "ds_configs" / "zero2.json")
    return r


BAD = [
    (dict(tensor=3), 8, 2, 0, "parallel", "tensor 3 x sequence 1 = 3 does not divide the 8 ranks"),
    (dict(tensor=8), 8, 2, 0, "parallel.tensor", "model.n_kv_heads=4 is not divisible by tensor=8"),
    (dict(tensor=2), 4, 3, 0, "parallel.tensor", "ZeRO stages 0-2"),
    (dict(tensor=4), 8, 2, 2, "parallel.tensor", "tensor=4 must divide the 2 ranks per node"),
    (dict(sequence=16), 16, 2, 0, "parallel.sequence", "model.n_heads=8 are not divisible by sequence=16"),
    (dict(tensor=2, sequence=8), 16, 2, 0, "parallel.sequence", "the 4 query heads per tensor rank are not"),
]


@pytest.mark.parametrize("parallel, world, stage, per_node, key, text", BAD)
def test_bad_layouts_are_one_line_recipe_errors(parallel, world, stage, per_node, key, text):
    with pytest.raises(RecipeError) as e:
        check_layout(_recipe(**parallel), world, stage, "r.yaml", per_node)
    assert e.value.key == key and text in e.value.problem
    assert "\n" not in e.value.line()


def test_more_layout_errors():
    r = _recipe(sequence=3)
    r.model = dataclasses.replace(r.model, n_heads=6, n_kv_heads=3, d_model=48)
    with pytest.raises(RecipeError, match="data.seq_len=64 is not divisible by sequence=3"):
        check_layout(r, 3, 2, "r.yaml")
    r = _recipe(tensor=2)
    r.posttrain.lora.rank = 4
    with pytest.raises(RecipeError, match="LoRA adapters are not tensor-parallel"):
        check_layout(r, 2, 2, "r.yaml")
    with pytest.raises(RecipeError, match="does not divide the 6 ranks"):
        make_layout(_recipe(tensor=4), 6, 0, "r.yaml")
    check_layout(_recipe(tensor=2, sequence=2), 8, 2, "r.yaml", 8)  # layouts that fit pass
    check_layout(_recipe(sequence=8), 8, 2, "r.yaml")  # 4 key/value heads over 8 ranks: repeated


def test_batch_keys_come_from_data_parallel_replicas():
    cfg = compose_ds_config(_recipe(), 4, "/tmp/run", "r.yaml", on_cpu=True)
    assert cfg["train_batch_size"] == 2 * 3 * 4
    cfg = compose_ds_config(_recipe(tensor=2), 2, "/tmp/run", "r.yaml", on_cpu=True)
    # DeepSpeed derives train_batch_size itself: it counts sequence ranks as data-parallel and sizes batches before
    # AutoTP forms its groups
    assert "train_batch_size" not in cfg
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (2, 3)
    r = _recipe(sequence=2)
    r.deepspeed.overrides = {"train_batch_size": 12}
    with pytest.raises(RecipeError, match="train_batch_size: with parallel.tensor or parallel.sequence > 1"):
        compose_ds_config(r, 2, "/tmp/run", "r.yaml", on_cpu=True)
    assert TrainConfig(micro_batch_size=2, grad_accum_steps=3).global_batch(Layout(8, 2, 2).data) == 12


def test_parity_layout_names():
    assert [
        (s.name, s.layout.tensor, s.layout.sequence, s.data, s.ranks) for s in parse_layouts("1,dp2,tp2.sp2,sp4.dp2")
    ] == [
        ("1", 1, 1, 1, 1),
        ("dp2", 1, 1, 2, 2),
        ("tp2.sp2", 2, 2, 1, 4),
        ("sp4.dp2", 1, 4, 2, 8),
    ]
    for bad in ("tp", "tp2.tp2", "pp2", "tp0", "1,1"):
        with pytest.raises(UserError):
            parse_layouts(bad)


def test_tensor_shards_merge_back_into_the_whole_weights():
    model = GPT(ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1))
    whole = model.state_dict()
    assert tensor_shard_dim("blocks.0.attn.wk.weight") == 0 and tensor_shard_dim("blocks.0.mlp.down.weight") == 1
    assert tensor_shard_dim("tok_emb.weight") is None and tensor_shard_dim("blocks.0.attn_norm.weight") is None
    shards = []
    for r in range(2):
        shard = {}
        for name, t in whole.items():
            dim = tensor_shard_dim(name)
            shard[name] = t if dim is None else t.chunk(2, dim=dim)[r]
        shards.append(shard)
    merged = merge_tensor_shards(shards)
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)


def test_the_planted_fault_only_touches_sequence_groups():
    f = FaultInjector("unsummed_sequence")
    loss = torch.tensor(3.0)
    assert float(f.loss(1, loss, sequence=2)) == 1.5 and float(f.loss(1, loss, sequence=1)) == 3.0


def _batch_recipe(tmp_path, **train):
    path = write_recipe(tmp_path / "b.yaml", tmp_path, tmp_path / "runs", train={"micro_batch_size": 4, **train})
    return load_recipe(str(path)), str(path)


def test_the_global_batch_is_kept_and_accumulation_derived(tmp_path):
    recipe, origin = _batch_recipe(tmp_path, global_batch_size=16)
    assert [resolve_batch(recipe, r, origin).train.grad_accum_steps for r in (1, 2, 4)] == [4, 2, 1]
    assert resolve_batch(recipe, 2, origin).train.global_batch(2) == 16
    plain, origin = _batch_recipe(tmp_path)
    assert resolve_batch(plain, 2, origin) is plain  # nothing set, nothing resumed: micro x accum x replicas
    # a resume keeps the checkpoint's global batch: 2 ranks x micro 4 saved 8; on 1 rank accumulation 2
    assert resolve_batch(plain, 1, origin, saved_batch=8).train.grad_accum_steps == 2
    consistent, origin = _batch_recipe(tmp_path, global_batch_size=16, grad_accum_steps=2)
    assert resolve_batch(consistent, 2, origin).train.grad_accum_steps == 2


def test_a_global_batch_that_cannot_be_kept_is_one_line(tmp_path):
    recipe, origin = _batch_recipe(tmp_path, global_batch_size=12)
    with pytest.raises(RecipeError) as e:
        resolve_batch(recipe, 2, origin)
    assert str(e.value) == (
        f"{origin}: train.global_batch_size: a global batch of 12 sequences is not a whole number of micro-batches "
        "of train.micro_batch_size=4 x 2 data-parallel replicas: set train.micro_batch_size to one of 1, 2, 3, 6"
    )
    # an sp2 run (1 replica, micro 8: 8 per step) resumed on the same 2 ranks as sp1 (2 replicas): 16 would be read
    plain, origin = _batch_recipe(tmp_path, micro_batch_size=8)
    with pytest.raises(RecipeError) as e:
        resolve_batch(plain, 2, origin, saved_batch=8)
    assert str(e.value) == (
        f"{origin}: train.micro_batch_size: a global batch of 8 sequences (the checkpoint's, kept on resume) is not a "
        "whole number of micro-batches of train.micro_batch_size=8 x 2 data-parallel replicas: set "
        "train.micro_batch_size to one of 1, 2, 4"
    )
    accum, origin = _batch_recipe(tmp_path, grad_accum_steps=2)
    with pytest.raises(RecipeError) as e:
        resolve_batch(accum, 2, origin, saved_batch=8)
    assert str(e.value) == (
        f"{origin}: train.grad_accum_steps: train.grad_accum_steps=2 x train.micro_batch_size=4 x 2 data-parallel "
        "replicas = 16 sequences per step, but the global batch is 8 (the checkpoint's, kept on resume): leave "
        "train.grad_accum_steps at 1 (it is derived), or set train.global_batch_size=16 to change it"
    )
    odd, origin = _batch_recipe(tmp_path, global_batch_size=6)
    with pytest.raises(RecipeError, match="use a number of data-parallel replicas that divides 6"):
        resolve_batch(odd, 4, origin)


def test_resume_moves_between_expert_sizes_through_the_universal_form_except_under_zero3():
    """Which layout changes a resume takes through DeepSpeed's universal form, and which it refuses (the moves
    themselves run bit for bit in tests/integration/test_zero_resume.py)."""
    from llmforge.errors import CheckpointError
    from llmforge.train.checkpoint import _needs_universal

    saved = {**Layout(2, expert=2).identity(), "zero_stage": 2}
    assert not _needs_universal(saved, "ckpt", Layout(2, expert=2), 2)
    assert _needs_universal(saved, "ckpt", Layout(2), 2)  # experts regrouped: every rank all of them
    assert _needs_universal(saved, "ckpt", Layout(4, expert=4), 1)  # world, stage and expert size at once
    assert _needs_universal({**Layout(2).identity(), "zero_stage": 1}, "ckpt", Layout(2, expert=2), 1)
    for before, after in ((Layout(2, expert=2), Layout(2)), (Layout(2), Layout(2, expert=2))):
        with pytest.raises(CheckpointError, match="does not regroup experts under ZeRO-3"):
            _needs_universal({**before.identity(), "zero_stage": 3}, "ckpt", after, 3)
    with pytest.raises(CheckpointError, match="cannot move it to ZeRO-3"):
        _needs_universal({**Layout(2).identity(), "zero_stage": 2}, "ckpt", Layout(4), 3)
