"""Hugging Face directories <-> llmforge runs: export a checkpoint as a transformers Llama (or Mixtral) directory,
import one as a run directory with a committed step-0 checkpoint."""

from __future__ import annotations

import dataclasses
import os

import torch

from llmforge.config import Recipe, recipe_to_yaml
from llmforge.config.parallel import Layout
from llmforge.config.recipe import DataConfig, RunConfig, TokenizerConfig, TrainConfig
from llmforge.model.hf import ExportError, from_hf, to_hf
from llmforge.tokenizer.export import save_hf_tokenizer
from llmforge.tokenizer.hf import HFTokenizer
from llmforge.train.checkpoint import Checkpointer, RunIdentity, TrainState
from llmforge.train.distributed import setup_env
from llmforge.train.engine import build_engine
from llmforge.train.loading import load_model


def export_hf(checkpoint: str, out: str) -> str:
    """Consolidate a checkpoint (any ZeRO stage) and write config.json + model.safetensors + the tokenizer (files
    `AutoTokenizer` loads) to the directory `out`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out}: is a file; give a directory (new, or one to write the model files into)")
    model, tok, _ = load_model(checkpoint)
    hf = to_hf(model)
    bos = getattr(tok, "bos_id", -1)
    special_ids = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": bos if bos >= 0 else None}
    for key, value in special_ids.items():
        setattr(hf.config, key, value)
        setattr(hf.generation_config, key, value)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    save_hf_tokenizer(tok, out)
    return out


def import_hf(directory: str, out: str) -> str:
    """A local Hugging Face Llama directory as an llmforge run directory `out` with one committed checkpoint
    (step 0, fp32 weights, the HF tokenizer): generate, evaluate, export and lm-eval read it like any run, and
    `train.init_from` starts continued pre-training or SFT from it."""
    import deepspeed

    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ExportError(f"{directory}: no tokenizer.json (a Hugging Face fast tokenizer is needed)")
    model = from_hf(directory)
    tok = HFTokenizer.load(directory)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ExportError(
            f"{directory}: the tokenizer has {tok.vocab_size} ids, the model only {model.cfg.vocab_size} embeddings"
        )
    out = os.path.abspath(out)
    recipe = Recipe(
        run=RunConfig(name=os.path.basename(out), output_dir=os.path.dirname(out)),
        data=DataConfig(seq_len=min(256, model.cfg.max_seq_len)),
        tokenizer=TokenizerConfig(type="hf", path=os.path.abspath(directory)),
        model=model.cfg,
        train=dataclasses.replace(TrainConfig(), precision="fp32", warmup_steps=0),
    )
    setup_env()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    layout = Layout(1)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    engine = build_engine(model, ds_config, layout).engine  # no optimizer: the checkpoint holds weights
    identity = RunIdentity(
        recipe,
        tok,
        data_fingerprint=None,
        layout=layout,
        zero_stage=0,
        extra={"imported_from": os.path.abspath(directory)},
    )
    path = Checkpointer(os.path.join(out, "checkpoints"), 1, identity).save(engine, TrainState())
    if path is None:
        raise ExportError(f"{out}: not enough disk space for the checkpoint")
    with open(os.path.join(out, "recipe.resolved.yaml"), "w", encoding="utf-8") as f:
        f.write(recipe_to_yaml(recipe))
    return path
