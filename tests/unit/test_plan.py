"""The planner's activation memory against what the model really keeps for backward (counted on CPU, bf16), and its
loss_chunk hint."""

from __future__ import annotations

import dataclasses

import pytest

from llmforge.config import load_recipe
from llmforge.config.recipe import ModelConfig
from llmforge.plan import activation_bytes, count_params, params_per_rank, plan, suggest_layout
from tests.helpers import SHAPES, kept_for_backward


@pytest.mark.parametrize("shape", SHAPES, ids=["rmsnorm-swiglu-gqa", "layernorm-gelu-mha"])
@pytest.mark.parametrize(
    "mode,every,loss_chunk,compiled",
    [
        ("none", 1, 0, False),
        ("none", 1, 64, False),
        ("selective", 1, 0, False),
        ("every_k", 2, 0, False),
        ("full", 1, 0, False),
        ("full", 1, 64, False),
    ],
)
def test_activation_bytes_match_what_backward_keeps(shape, mode, every, loss_chunk, compiled):
    seq, batch = 64, 3
    cfg = ModelConfig(max_seq_len=seq, **shape)
    measured = kept_for_backward(cfg, seq, batch, mode, every, loss_chunk, compiled)
    # eager CPU runs RMSNorm as its unfused composite (fp32 copies); the GPU plan counts the fused kernel
    predicted = activation_bytes(
        cfg, seq, batch, mode, every, fused_norm=False, loss_chunk=loss_chunk, compiled=compiled, transients=False
    )
    assert abs(predicted - measured) <= 0.1 * measured, (measured, predicted)


def test_plan_counts_loss_chunk():
    """A 32k vocabulary at 4 x 2048 tokens: the logits dominate without chunking; train.loss_chunk removes them."""
    recipe = load_recipe("recipes/llama-125m.yaml", ["train.micro_batch_size=4"])
    whole = {(r.stage, r.checkpointing): r for r in plan(recipe, "recipes/llama-125m.yaml", 8, 80, vocab_size=32000)}
    chunked_recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, loss_chunk=1024))
    chunked = {
        (r.stage, r.checkpointing): r for r in plan(chunked_recipe, "recipes/llama-125m.yaml", 8, 80, vocab_size=32000)
    }
    logits_gb = 4 * 2048 * 32000 * (8 + 2) / 1024**3
    for key, row in whole.items():
        saved = row.activations_gb - chunked[key].activations_gb
        assert saved == pytest.approx(logits_gb * (1 - 1024 / (4 * 2048)), rel=1e-6), key
        assert chunked[key].params_gb == row.params_gb and chunked[key].tokens_per_s == row.tokens_per_s


def test_plan_counts_train_compile():
    """train.compile: per token the logits cost 2V (bf16 kept) + 8 (fp32 log-sum-exp) + 2V (bf16 gradient) bytes
    instead of 4V (fp32 log-softmax) + 6V (fp32 and bf16 gradients), and each SwiGLU keeps 3·ff instead of 4·ff
    16-bit values (every block without checkpointing; the one block recomputed at a time under full)."""
    recipe = load_recipe("recipes/llama-125m.yaml", ["train.micro_batch_size=4"])
    eager = {(r.stage, r.checkpointing): r for r in plan(recipe, "recipes/llama-125m.yaml", 8, 80, vocab_size=32000)}
    compiled = load_recipe("recipes/llama-125m.yaml", ["train.micro_batch_size=4", "train.compile=true"])
    T, m = 4 * 2048, recipe.model
    for r in plan(compiled, "recipes/llama-125m.yaml", 8, 80, vocab_size=32000):
        saved = eager[r.stage, r.checkpointing].activations_gb - r.activations_gb
        blocks = {"none": m.n_layers, "selective": m.n_layers, "full": 1}[r.checkpointing]
        assert saved == pytest.approx((T * (6 * 32000 - 8) + blocks * T * 2 * m.ff_dim) / 1024**3, rel=1e-9)


def test_plan_divides_by_the_layout():
    """tensor 2: block Linear weights halved (embedding, norms, head whole), attention and MLP activations halved;
    sequence 2: every per-token tensor halved; ZeRO shards over data x sequence; communication only in the
    dimensions that exist."""
    recipe = load_recipe("recipes/llama-1b.yaml")
    cfg = dataclasses.replace(recipe.model, vocab_size=32000, max_seq_len=2048)
    d, ff, kv, L, V = cfg.d_model, cfg.ff_dim, cfg.kv_heads * cfg.head_dim, cfg.n_layers, 32000
    block_linears = L * (2 * d * d + 2 * d * kv + 3 * d * ff)
    whole = params_per_rank(cfg, 1)
    assert whole == count_params(cfg)[0]
    assert params_per_rank(cfg, 2) == whole - block_linears // 2
    assert whole - block_linears == V * d + (2 * L + 1) * d  # tied embedding/head and the norms

    acts = {tp: activation_bytes(cfg, 2048, 1, "none", tensor=tp) for tp in (1, 2)}
    assert acts[2] < acts[1] and acts[2] > acts[1] / 2  # norms, boundaries and logits are not split
    assert activation_bytes(cfg, 1024, 1, "none") < acts[1] * 0.51  # sequence 2: half the tokens per rank

    def rows(**parallel):
        r = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, **parallel))
        return {(x.stage, x.checkpointing): x for x in plan(r, "recipes/llama-1b.yaml", 8, 80, vocab_size=V)}

    base, tp2, sp2 = rows(), rows(tensor=2), rows(sequence=2)
    assert (3, "none") not in tp2  # AutoTP runs with ZeRO 0-2
    assert tp2[(1, "none")].params_gb == pytest.approx(base[(1, "none")].params_gb * params_per_rank(cfg, 2) / whole)
    # ZeRO-1 shards the optimizer over the 8 ranks with or without sequence parallelism; over 4 under tensor 2
    assert sp2[(1, "none")].optimizer_gb == pytest.approx(base[(1, "none")].optimizer_gb)
    assert base[(1, "none")].comm_gb["tensor"] == base[(1, "none")].comm_gb["sequence"] == 0.0
    assert tp2[(1, "none")].comm_gb["tensor"] > 0 and tp2[(1, "none")].comm_gb["sequence"] == 0.0
    assert sp2[(1, "full")].comm_gb["sequence"] > sp2[(1, "none")].comm_gb["sequence"] > 0  # recomputed a2a


def test_suggested_layout_takes_sequence_parallelism_when_the_context_needs_it():
    recipe = load_recipe("recipes/llama-1b-32k.yaml", ["data.seq_len=524288", "parallel.sequence=1"])
    # one GPU cannot hold a 512k-token sequence of this model, whatever the ZeRO stage and checkpointing
    assert not any(r.fits for r in plan(recipe, "r.yaml", 8, 80, vocab_size=32000))
    tp, sp, row = suggest_layout(recipe, "r.yaml", 8, 80, vocab_size=32000)
    assert (tp, sp) == (1, 2) and row.fits and row.total_gb <= 0.95 * 80  # the fewest model-parallel ranks
    assert suggest_layout(recipe, "r.yaml", 8, 1, vocab_size=32000) is None  # 1 GB GPUs: nothing fits
