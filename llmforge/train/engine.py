"""The one place a DeepSpeed engine is built around llmforge's GPT, for training runs, imports and the benchmarks
alike: the layout's process groups, the model's wraps, the DeepSpeed sections the layout implies, the optimizer's
parameter groups, and after `deepspeed.initialize` the MoE router outputs and the check that DeepSpeed's groups
are the layout's."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from llmforge.config.deepspeed import zero_stage
from llmforge.config.parallel import Layout, ProcessGroups
from llmforge.config.recipe import ActivationCheckpointingConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
from llmforge.model import GPT, apply_wraps
from llmforge.model.parallel import attach_router_outputs
from llmforge.train.guard import FaultInjector


@dataclass
class Built:
    engine: Any
    groups: ProcessGroups
    config: dict  # the DeepSpeed config the engine was built with (the layout's sections included)
    adapters: int = 0  # trainable LoRA parameters (0 without LoRA)


def build_engine(
    model: GPT,
    ds_config: dict,
    layout: Layout,
    train: Optional[TrainConfig] = None,
    checkpointing: Optional[ActivationCheckpointingConfig] = None,
    lora: Optional[LoraConfig] = None,
    faults: Optional[FaultInjector] = None,
) -> Built:
    """Wrap `model` for `layout` and build its engine. `train` sets the optimizer (its parameter groups; None: an
    engine without one, to save or load weights), torch.compile and FP8; `ds_config` is left as given (the
    engine gets a copy with the layout's sections added)."""
    import deepspeed

    config = {**copy.deepcopy(ds_config), **layout.deepspeed_sections(model.cfg)}
    groups = layout.process_groups()
    adapters = apply_wraps(
        model,
        lora or LoraConfig(),
        checkpointing or ActivationCheckpointingConfig(),
        train is not None and train.compile,
        groups.sequence,
        fp8=None if train is None else train.fp8,
    )
    optimizer = optimizer_args(model, train) if train is not None else {}
    engine, *_ = deepspeed.initialize(model=model, config=config, **optimizer)
    if layout.expert > 1:
        attach_router_outputs(engine.module, model.cfg)
        (faults or FaultInjector()).lose_expert_gradients(engine.module)  # a test hook; nothing unless asked
    return Built(engine, groups.adopt_deepspeed(engine), config, adapters)


def build_model(recipe_or_cfg: Recipe | ModelConfig, ds_config: dict) -> GPT:
    """The GPT, partitioned at construction under ZeRO-3 (no rank ever holds the whole model), else whole."""
    import deepspeed

    cfg = recipe_or_cfg.model if isinstance(recipe_or_cfg, Recipe) else recipe_or_cfg
    if zero_stage(ds_config) != 3:
        return GPT(cfg)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(cfg)
    # Parameters were partitioned as each submodule was built, so GPT's own init ran on empty shards: redo it on
    # gathered weights (rank 0's values are broadcast). Same seed and RNG use as the unpartitioned path.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.reset_parameters()
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embeddings (tied or not). A parameter's dimensions
    are its full shape's: under ZeRO-3 a partitioned parameter's own tensor is an empty 1-D placeholder (ds_shape
    holds the shape), which would put every matrix among the norms and train without weight decay."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
        (decay if matrix and id(p) not in embedding_ids else no_decay).append(p)
    # named: DeepSpeed splits each group by expert-parallel group under AutoEP and names the parts after it
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def optimizer_args(model: nn.Module, t: TrainConfig) -> dict:
    """What deepspeed.initialize gets for the optimizer: AdamW's parameter groups (DeepSpeed builds AdamW from the
    composed config), or a Muon optimizer llmforge builds itself."""
    if t.optimizer == "adamw":
        return {"model_parameters": param_groups(model, t.weight_decay)}
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    return {"optimizer": MuonWithAuxAdam(muon_param_groups(model, t), adam_optimizer=torch.optim.AdamW)}


def muon_param_groups(model: nn.Module, t: TrainConfig) -> list[dict]:
    """Muon on the blocks' matrices; AdamW on the rest (embeddings, LM head: with and without decay as
    param_groups splits them; norms). Each parameter is tagged use_muon, which DeepSpeed's ZeRO optimizers read.
    DeepSpeed's own tagging (optimizer type Muon in the config) goes by names ("embed", "lm_head") that would put
    llmforge's tok_emb under Muon, hence groups built here. A Muon group's lr_scale (muon.lr / train.lr) makes the
    trainer's schedule give it muon.lr x the schedule's shape."""
    blocks = {id(p) for name, p in model.named_parameters() if name.startswith("blocks.")}
    muon: list[nn.Parameter] = []
    adam: list[dict] = []
    for group in param_groups(model, t.weight_decay):
        rest: list[nn.Parameter] = []
        for p in group["params"]:
            use = id(p) in blocks and len(getattr(p, "ds_shape", p.shape)) >= 2
            p.use_muon = use
            (muon if use else rest).append(p)
        if rest:
            adam.append({**group, "params": rest, "use_muon": False, "lr": t.lr, "betas": tuple(t.betas), "eps": t.eps})
    decay = t.weight_decay if t.muon.weight_decay is None else t.muon.weight_decay
    muon_group = {
        "params": muon,
        "use_muon": True,
        "lr": t.muon.lr,
        "momentum": t.muon.momentum,
        "weight_decay": decay,
        "lr_scale": t.muon.lr / t.lr,
    }
    return [muon_group, *adam]
