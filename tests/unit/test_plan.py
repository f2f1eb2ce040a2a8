"""The planner's activation memory against what the model really keeps for backward (counted on CPU, bf16), and its
loss_chunk hint."""

from __future__ import annotations

import dataclasses

import pytest

from llmforge.config import load_recipe
from llmforge.config.recipe import ModelConfig
from llmforge.plan import activation_bytes, plan
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
