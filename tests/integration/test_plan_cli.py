"""`llmforge plan` as a user runs it: the loss_chunk hint where the logits weigh."""

from __future__ import annotations

import dataclasses
import sys

from llmforge.config import load_recipe
from llmforge.plan import activation_bytes, loss_chunk_hint
from tests.helpers import run_cli


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
