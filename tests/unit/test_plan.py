"""The planner's activation memory against what the model really keeps for backward (counted on CPU, bf16), and its
loss_chunk hint."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from llmforge.config import load_recipe
from llmforge.config.recipe import ActivationCheckpointingConfig, ModelConfig
from llmforge.model import GPT, apply_activation_checkpointing, compile_model
from llmforge.plan import activation_bytes, loss_chunk_hint, plan
from tests.conftest import run_cli


def kept_for_backward(
    cfg: ModelConfig, seq: int, batch: int, mode: str, every: int, loss_chunk: int, compiled: bool = False
) -> int:
    """Bytes of the distinct storages autograd keeps after a bf16 forward with targets (parameters excluded)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(torch.bfloat16)
    apply_activation_checkpointing(model, ActivationCheckpointingConfig(mode=mode, every=every))
    if compiled:  # blocks and loss as train.compile builds them
        torch._dynamo.reset()
        compile_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, x, loss_chunk=loss_chunk)
    loss.backward()  # the graph is whole: backward runs
    return sum(kept.values())


SHAPES = [
    dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=1000),
    dict(d_model=96, n_layers=3, n_heads=6, d_ff=256, vocab_size=500, norm="layernorm", mlp="gelu", position="learned"),
]


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
        ("none", 1, 0, True),
        ("selective", 1, 0, True),
        ("full", 1, 64, True),
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


def test_plan_hints_loss_chunk_where_the_logits_weigh():
    """llama-125m (8 x 2048 tokens, 32k vocabulary): the logits are a large share, so `llmforge plan` names the
    saving; none once loss_chunk is set, and none for llama-1b (4 sequences: the blocks dominate)."""
    recipe = load_recipe("recipes/llama-125m.yaml")
    hint = loss_chunk_hint(recipe, 32000)
    cfg = dataclasses.replace(recipe.model, vocab_size=32000, max_seq_len=2048)
    saved = activation_bytes(cfg, 2048, 8, "none") - activation_bytes(cfg, 2048, 8, "none", loss_chunk=2048)
    assert hint is not None and f"would hold {saved / 1024**3:.2f} GB less per GPU" in hint
    fused = activation_bytes(cfg, 2048, 8, "none") - activation_bytes(cfg, 2048, 8, "none", compiled=True)
    assert fused > 8 * 2048 * 6 * 32000  # at least the logits' fp32 share (see test_plan_counts_train_compile)
    assert hint.endswith(f"; train.compile (fused loss, compiled blocks) {fused / 1024**3:.2f} GB less")
    compiled_hint = loss_chunk_hint(load_recipe("recipes/llama-125m.yaml", ["train.compile=true"]), 32000)
    assert compiled_hint is not None and "train.compile" not in compiled_hint
    assert loss_chunk_hint(load_recipe("recipes/llama-125m.yaml", ["train.loss_chunk=1024"]), 32000) is None
    assert loss_chunk_hint(load_recipe("recipes/llama-1b.yaml"), 32000) is None
    r = run_cli(
        sys.executable,
        "-m",
        "llmforge.cli",
        "plan",
        "--recipe",
        "recipes/llama-125m.yaml",
        "--gpus",
        "8",
        "--gpu-memory",
        "80GB",
    )
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == hint, r.stdout[-500:]
