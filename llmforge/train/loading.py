"""Models from runs: rebuild a GPT (weights, tokenizer, recipe) from an llmforge checkpoint without a DeepSpeed
engine, the starting point of a run with train.init_from, and sampling from a checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Optional

import torch
import yaml

from llmforge.config import Recipe, recipe_from_dict
from llmforge.errors import CheckpointError, RecipeError
from llmforge.model.generate import generate
from llmforge.model.gpt import GPT
from llmforge.model.hf import from_hf
from llmforge.model.lora import apply_lora, merge_lora
from llmforge.model.parallel import autoep_to_gpt_names, merge_expert_files, merge_tensor_shards
from llmforge.tokenizer import Tokenizer, tokenizer_from_json
from llmforge.tokenizer.hf import HFTokenizer
from llmforge.train.checkpoint import convert_to_universal
from llmforge.train.checkpoint_files import STATE, find_checkpoint, load_model_states

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    load_dir, tag = os.path.split(path.rstrip("/"))
    dense = sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))
    if len(dense) > 1:  # tensor-parallel: one file per tensor rank, each holding its shards
        state = merge_tensor_shards([load_model_states(f)["module"] for f in dense])
    elif dense:  # ZeRO 0-2: rank 0 holds the full (training-precision) module state
        state = load_model_states(dense[0])["module"]
    elif not _expert_parallel(path):  # ZeRO-3: gather the fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    else:  # ZeRO-3 with expert parallelism: zero_to_fp32 cannot gather experts; DeepSpeed's universal form does
        state = _universal_state_dict(path)
    experts = sorted(glob.glob(os.path.join(path, "layer_*_expert_*_model_states.pt")))
    if experts:  # expert-parallel (AutoEP): the experts are in files of their own
        state = {**autoep_to_gpt_names(state), **merge_expert_files([load_model_states(f) for f in experts])}
    return {k.replace(WRAPPER_PREFIX, ""): v for k, v in state.items()}


def _expert_parallel(path: str) -> bool:
    with open(os.path.join(path, STATE), encoding="utf-8") as f:
        return json.load(f).get("expert_parallel", 1) > 1


def _universal_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value from the checkpoint converted to DeepSpeed's universal form (in a temporary
    directory: the checkpoint is not changed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "universal")
        convert_to_universal(path, out)
        zero = os.path.join(out, "zero")
        state = {}
        for name in os.listdir(zero):
            if not os.path.isfile(os.path.join(zero, name, "fp32.pt")):
                continue  # optimizer_state.pt and other files beside the parameters' directories
            value = torch.load(os.path.join(zero, name, "fp32.pt"), map_location="cpu", weights_only=True)
            state[name] = value["param"] if isinstance(value, dict) else value  # experts come with metadata
    return autoep_to_gpt_names(state)


def load_model(
    checkpoint: str, dtype: torch.dtype = torch.float32, flag: str = "--checkpoint"
) -> tuple[GPT, Tokenizer, Recipe]:
    """Model in eval mode, its tokenizer and resolved recipe, from a run dir, checkpoints dir or checkpoint (`flag`
    names the option it came from, for errors)."""
    path = find_checkpoint(checkpoint, flag)
    with open(os.path.join(path, "recipe.yaml"), encoding="utf-8") as f:
        recipe = recipe_from_dict(yaml.safe_load(f), os.path.join(path, "recipe.yaml"))
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
        tok = tokenizer_from_json(json.load(f))
    model = GPT(recipe.model)
    lora = recipe.posttrain.lora
    if lora.rank:
        apply_lora(model, lora)
    state = _state_dict(path)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # DeepSpeed's universal form keeps parameters flat: give them the model's shapes back
    state = {
        k: v.view(shapes[k]) if k in shapes and v.dim() == 1 and len(shapes[k]) > 1 else v for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and recipe.model.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    if lora.rank:
        merge_lora(model)
    return model.to(dtype).eval(), tok, recipe


def load_pretrained(path: str) -> tuple[GPT, Tokenizer]:
    """Starting weights and tokenizer for fine-tuning or continued training: an llmforge run dir / checkpoint (LoRA
    adapters merged), or a local Hugging Face Llama directory (config.json + weights + tokenizer files)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise CheckpointError(f"{path}: a Hugging Face model directory needs its tokenizer.json")
        return from_hf(path), HFTokenizer.load(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found (expected an llmforge run dir / checkpoint or a Hugging Face dir)")
    model, tok, _ = load_model(path, flag="train.init_from")
    return model, tok


def starting_point(
    recipe: Recipe,
    origin: str,
    resume_from: Optional[str],
    extend_tokenizer: Optional[Callable[[Tokenizer], Tokenizer]] = None,
) -> tuple[Recipe, Optional[GPT], Tokenizer]:
    """What a run with train.init_from starts from: (recipe with the starting model's architecture, its weights or
    None when resuming, its tokenizer). A resumed run takes architecture and tokenizer from its own checkpoint; a
    fresh one from init_from, with `extend_tokenizer(tok)` applied (the vocabulary grows to match). Training-time
    choices (activation checkpointing, dropout) stay the recipe's."""
    path = recipe.train.init_from
    model = None
    if resume_from is not None:
        with open(os.path.join(resume_from, "tokenizer.json"), encoding="utf-8") as f:
            tok = tokenizer_from_json(json.load(f))
        with open(os.path.join(resume_from, "recipe.yaml"), encoding="utf-8") as f:
            cfg = recipe_from_dict(yaml.safe_load(f), resume_from).model
    else:
        if not os.path.exists(path):
            raise RecipeError(origin, "train.init_from", f"not found: {path}")
        model, tok = load_pretrained(path)
        if extend_tokenizer is not None:
            tok = extend_tokenizer(tok)
            model = resize_vocab(model, tok.vocab_size, recipe.run.seed)
        cfg = model.cfg
    if recipe.data.seq_len > cfg.max_seq_len:
        raise RecipeError(
            origin,
            "data.seq_len",
            f"{recipe.data.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len} (from {path})",
        )
    cfg = dataclasses.replace(
        cfg, activation_checkpointing=recipe.model.activation_checkpointing, dropout=recipe.model.dropout
    )
    return dataclasses.replace(recipe, model=cfg), model, tok


def resize_vocab(model: GPT, vocab_size: int, seed: int = 0) -> GPT:
    """The same model with `vocab_size` rows of embedding (and LM head): existing rows kept, new rows the mean of the
    old ones plus N(0, init_std) noise, so new tokens start distinct and in distribution."""
    old = model.cfg.vocab_size
    if vocab_size <= old:
        return model
    cfg = dataclasses.replace(model.cfg, vocab_size=vocab_size)
    new = GPT(cfg)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for key in ("tok_emb.weight",) + (() if cfg.tie_embeddings else ("lm_head.weight",)):
        w = state[key]
        extra = w.float().mean(0, keepdim=True) + cfg.init_std * torch.randn(
            vocab_size - old, w.shape[1], generator=gen
        )
        state[key] = torch.cat([w, extra.to(w.dtype)])
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    new.load_state_dict(state)
    return new


def load_weights(model: GPT, source: GPT, zero3: bool) -> None:
    """Copy `source`'s weights into the (possibly ZeRO-3 partitioned) freshly built model."""
    state = source.state_dict()
    if not zero3:
        model.load_state_dict(state)
        return
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def generate_text(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    use_cache: bool = True,
) -> str:
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's loading chatter must not mix with the text
        model, tok, _ = load_model(checkpoint)
    ids = tok.encode(prompt) or [tok.eos_id]
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, use_cache, gen)
    return tok.decode(out[0].tolist())
