"""Numerics pieces in-process: the oracle against a hand-written step, ZeRO-0 with bf16/fp16 refused (and the planner
agreeing), the parity variant names, the planted dropped-gradient fault."""

from __future__ import annotations

import math

import pytest
import torch

from llmforge.config import load_recipe
from llmforge.config.deepspeed import compose_ds_config
from llmforge.data.loader import PretrainData
from llmforge.errors import RecipeError, UserError
from llmforge.model import GPT
from llmforge.parity import LayoutSpec, parse_layouts
from llmforge.plan import plan
from llmforge.tokenizer import fingerprint, load_tokenizer
from llmforge.train.guard import FaultInjector
from llmforge.train.oracle import oracle_steps
from llmforge.train.task import resolve_model_config
from tests.helpers import REPO, write_recipe


def _recipe(tmp_path, prepared, **train):
    return write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 3, "warmup_steps": 1, "grad_clip": 0.5, **train},
        eval={"interval": 0},
    )


def test_the_oracle_is_the_written_out_adamw_step(tmp_path, prepared):
    """Three steps of the oracle against AdamW written out from its published definition (Loshchilov & Hutter:
    decoupled decay; Kingma & Ba: bias-corrected moments), on the same samples, with the clipping rule and the
    decay on matrices only."""
    path = _recipe(tmp_path, prepared)
    recipe = load_recipe(str(path))
    run = oracle_steps(recipe, str(path), 3, global_batch=8, micro_batch=4)

    tok = load_tokenizer(recipe.tokenizer, str(path))
    recipe = resolve_model_config(recipe, tok.vocab_size, str(path))
    t = recipe.train
    data = PretrainData(recipe.data.dataset_dirs(), recipe.data.seq_len, recipe.run.seed, "train", fingerprint(tok))
    torch.manual_seed(recipe.run.seed)
    model = GPT(recipe.model)
    params = dict(model.named_parameters())
    decayed = {n for n, p in params.items() if p.dim() >= 2 and n != "tok_emb.weight"}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    (b1, b2) = t.betas
    for step in range(1, 4):
        lr = t.lr * step / t.warmup_steps if step <= t.warmup_steps else None
        if lr is None:  # cosine from lr to min_lr over the steps after warmup
            progress = (step - 1 - t.warmup_steps) / (t.max_steps - t.warmup_steps)
            lr = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
        model.zero_grad()
        inputs, targets = data.batch(range((step - 1) * 8, step * 8))  # the step's 8 samples, one batch
        _, loss = model(inputs, targets)
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params.values()))
        assert abs(run.losses[step] - float(loss.detach())) <= 1e-6 * float(loss.detach()), step
        assert abs(run.grad_norms[step] - norm) <= 1e-5 * norm, step
        clip = min(1.0, t.grad_clip / (norm + 1e-6))
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad * clip
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                if n in decayed:
                    p.mul_(1 - lr * t.weight_decay)
                update = (m[n] / (1 - b1**step)) / ((v[n] / (1 - b2**step)).sqrt() + t.eps)
                p.sub_(lr * update)
    assert run.grad_norms[1] > t.grad_clip  # the clipping rule was exercised


def test_zero0_with_16_bit_precision_is_refused_and_the_planner_agrees(tmp_path, prepared):
    zero0 = str(REPO / "ds_configs" / "zero0.json")
    for precision in ("bf16", "fp16"):
        recipe = load_recipe(
            str(_recipe(tmp_path, prepared)), [f"deepspeed.config={zero0}", f"train.precision={precision}"]
        )
        with pytest.raises(RecipeError) as e:
            compose_ds_config(recipe, 1, "/tmp/run", "r.yaml", on_cpu=False)
        line = str(e.value)
        assert "\n" not in line and "deepspeed.config" in line and "zero1.json" in line and precision in line
    for precision, stage in (("fp32", 0), ("bf16", 1)):
        ds = str(REPO / "ds_configs" / f"zero{stage}.json")
        recipe = load_recipe(
            str(_recipe(tmp_path, prepared)), [f"deepspeed.config={ds}", f"train.precision={precision}"]
        )
        assert compose_ds_config(recipe, 1, "/tmp/run", "r.yaml", on_cpu=False)["zero_optimization"]["stage"] == stage
    for precision, stages in (("bf16", {1, 2, 3}), ("fp32", {0, 1, 2, 3})):
        recipe = load_recipe("recipes/llama-125m.yaml", [f"train.precision={precision}"])
        assert {r.stage for r in plan(recipe, "recipes/llama-125m.yaml", 8, 80, vocab_size=32000)} == stages


def test_parity_variant_names():
    z3, acc = parse_layouts("z3off.bf16.acc2.dp2,ckpt-every2.untied.compile")
    assert (z3.zero, z3.precision, z3.accum, z3.data, z3.ranks) == ("zero3_offload.json", "bf16", 2, 2, 2)
    assert (acc.checkpointing, acc.tied, acc.compile, acc.ranks) == ("every_k:2", False, True, 1)
    assert z3.sets("/d") == [
        "parallel.tensor=1",
        "parallel.sequence=1",
        "deepspeed.config=/d/zero3_offload.json",
        "train.precision=bf16",
    ]
    assert acc.sets("/d")[2:] == [
        "model.activation_checkpointing.mode=every_k",
        "model.activation_checkpointing.every=2",
        "train.compile=true",
        "model.tie_embeddings=false",
    ]
    assert acc.model_sets() == ["model.tie_embeddings=false"] and LayoutSpec("1").model_sets() == []
    for bad in ("z4", "fp32.bf16", "acc0", "ckpt-every0", "ckpt-some", "bf16.", "z1,z1"):
        with pytest.raises(UserError):
            parse_layouts(bad)


def test_the_dropped_gradient_fault_takes_the_last_micro_batch_only():
    f = FaultInjector("dropped_micro")
    assert [f.drops_gradients(m, 3) for m in range(3)] == [False, False, True]
    assert not f.drops_gradients(0, 1) and not FaultInjector("").drops_gradients(1, 2)
