"""`pretrain()`: recipe → validated inputs → DeepSpeed engine → resume → Trainer. Nothing is written until every
user-fixable problem (recipe, DeepSpeed JSON, tokenizer, data, --resume path) has been checked."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from llmforge import allocator
from llmforge.config import Recipe, load_recipe, recipe_to_dict, recipe_to_yaml
from llmforge.config.deepspeed import compose_ds_config, zero_stage
from llmforge.data.loader import PretrainData
from llmforge.errors import CheckpointError, DataError, RecipeError
from llmforge.model import GPT, apply_activation_checkpointing, compile_model, compile_unavailable
from llmforge.model.flops import device_peak_flops, flops_per_token
from llmforge.tokenizer import fingerprint, load_tokenizer
from llmforge.train import checkpoint as ckpt
from llmforge.train.distributed import release_shm_segment, setup_env
from llmforge.train.guard import FaultInjector, StopSignal
from llmforge.train.metrics import Metrics
from llmforge.train.trainer import Trainer, TrainState

log = logging.getLogger("llmforge")


def setup_logging() -> None:
    """INFO on rank 0, warnings elsewhere."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("llmforge").setLevel(level)


def resolve_model_config(recipe: Recipe, vocab_size: int, origin: str) -> Recipe:
    """Fill model.vocab_size / max_seq_len from the tokenizer and data when the recipe leaves them null."""
    m = recipe.model
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise RecipeError(origin, "model.vocab_size", f"{m.vocab_size} is below the tokenizer's {vocab_size}")
    model = dataclasses.replace(m, vocab_size=m.vocab_size or vocab_size,
                                max_seq_len=m.max_seq_len or recipe.data.seq_len)
    return dataclasses.replace(recipe, model=model)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embeddings (tied or not)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(recipe: Recipe, ds_config: dict) -> GPT:
    """The GPT, partitioned at construction under ZeRO-3 (no rank ever holds the whole model), else whole."""
    import deepspeed

    if zero_stage(ds_config) != 3:
        return GPT(recipe.model)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(recipe.model)
    # Parameters were partitioned as each submodule was built, so GPT's own init ran on empty shards: redo it on
    # gathered weights (rank 0's values are broadcast). Same seed and RNG use as the unpartitioned path.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.reset_parameters()
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(recipe_path: str, overrides: Optional[list[str]] = None, resume: str = "auto") -> dict:
    """Pre-train from a recipe; returns a summary (steps, first/last val loss, run dir, status)."""
    return run_training(recipe_path, overrides, resume, "pretrain")


def run_training(recipe_path: str, overrides: Optional[list[str]] = None, resume: str = "auto",
                 task: str = "pretrain") -> dict:
    """Pre-training, SFT or DPO (task) from a recipe: the same engine, loop, checkpoints and resume for all three."""
    stop = StopSignal()  # first: a preemption signal during start-up must not kill the process
    setup_env()
    recipe = load_recipe(recipe_path, overrides)
    world = int(os.environ["WORLD_SIZE"])

    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    run_dir, ckpt_dir = recipe.run_dir, recipe.checkpoint_dir
    ds_config = compose_ds_config(recipe, world, run_dir, recipe_path, on_cpu)
    if recipe.train.precision == "fp16" and on_cpu:
        raise RecipeError(recipe_path, "train.precision", "fp16 needs a GPU; use bf16 or fp32 on CPU")
    if recipe.train.compile and (problem := compile_unavailable(on_cpu)):
        raise RecipeError(recipe_path, "train.compile", f"{problem}; or set train.compile: false")
    resume_from = ckpt.resolve_resume(resume, ckpt_dir)
    job = init_model = None
    if task == "pretrain":
        tok = load_tokenizer(recipe.tokenizer, recipe_path)
        tok_fp = fingerprint(tok)
        if recipe.train.init_from:
            recipe, init_model = _continue_from(recipe, recipe_path, tok_fp, resume_from)
        else:
            recipe = resolve_model_config(recipe, tok.vocab_size, recipe_path)
        specs = recipe.data.dataset_dirs()
        train_data = PretrainData(specs, recipe.data.seq_len, recipe.run.seed, "train", tok_fp)
        val_data = PretrainData(specs, recipe.data.seq_len, recipe.run.seed + 1, "val", tok_fp)
        if recipe.eval.interval and val_data.num_samples == 0:
            raise DataError(f"eval.interval is {recipe.eval.interval} but the val split of "
                            f"{', '.join(s.path for s in specs)} has no sample of seq_len+1={recipe.data.seq_len + 1} "
                            f"tokens: prepare it with data.val_fraction > 0, or set eval.interval: 0")
    else:
        from llmforge.posttrain import setup as post

        if recipe.posttrain.lora.rank and zero_stage(ds_config) == 3:
            raise RecipeError(recipe_path, "posttrain.lora.rank", "LoRA runs under ZeRO stage 0-2 (the adapters "
                                                                  "are small); use ds_configs/zero2.json")
        job = post.prepare(task, recipe, recipe_path, resume_from)
        recipe, tok, train_data, val_data = job.recipe, job.tok, job.train_data, job.val_data
        tok_fp = fingerprint(tok)
    saved: dict = {}
    elastic = False
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        _check_compatible(saved, resume_from, tok_fp, train_data.fingerprint, recipe.data.allow_fingerprint_change)
        elastic = _needs_universal(saved, resume_from, world, zero_stage(ds_config))
        if elastic:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

    import deepspeed

    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    release_shm_segment()
    seed_everything(recipe.run.seed)
    model = build_model(recipe, ds_config)
    if job is not None:
        init_model, job.init_model = job.init_model, None
    if init_model is not None:
        from llmforge.posttrain.setup import load_weights

        load_weights(model, init_model, zero_stage(ds_config) == 3)
        init_model = None
    if job is not None:
        if recipe.posttrain.lora.rank:
            from llmforge.posttrain.lora import apply_lora

            log.info("LoRA rank %d on %s: %d trainable parameters", recipe.posttrain.lora.rank,
                     ",".join(recipe.posttrain.lora.targets), apply_lora(model, recipe.posttrain.lora))
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (full size of a ZeRO-3 partitioned param)
    n_params = sum(numel(p) for p in model.parameters())
    n_embed = sum(numel(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    apply_activation_checkpointing(model, recipe.model.activation_checkpointing)
    if recipe.train.compile:
        compile_model(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, recipe.train.weight_decay),
                                           config=ds_config)
    is_main = engine.global_rank == 0
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "recipe.resolved.yaml"), "w", encoding="utf-8") as f:
            f.write(recipe_to_yaml(recipe))
        with open(os.path.join(run_dir, "ds_config.json"), "w", encoding="utf-8") as f:
            json.dump(ds_config, f, indent=2)
        log.info("model: %.2fM parameters (%.2fM non-embedding), %d ranks, ZeRO stage %d, %s on %s",
                 n_params / 1e6, (n_params - n_embed) / 1e6, world, zero_stage(ds_config), recipe.train.precision,
                 accel.device_name())
        log.info(allocator.describe())
    metrics = Metrics(run_dir, is_main, getattr(engine, "monitor", None))

    state = TrainState()
    if resume_from is not None:
        started = time.time()
        load_from = ckpt.ensure_universal(resume_from) if elastic else resume_from
        client = ckpt.load_checkpoint(engine, load_from)
        state = TrainState(step=client["step"], consumed_samples=client["consumed_samples"],
                           guard=client.get("guard", {}))
        if elastic:
            metrics.event("elastic_resume", from_world=saved.get("world_size"), to_world=world,
                          from_stage=saved.get("zero_stage"), to_stage=zero_stage(ds_config))
        metrics.event("resumed", step=state.step, checkpoint=resume_from,
                      resume_s=round(time.time() - started, 3))

    tokenizer_json = json.dumps(tok.to_json(), ensure_ascii=False)
    recipe_dict = recipe_to_dict(recipe)

    save_faults = FaultInjector()

    def save(s: TrainState) -> None:
        started = time.time()
        client_state = {"step": s.step, "consumed_samples": s.consumed_samples, "guard": s.guard,
                        "world_size": world, "zero_stage": zero_stage(ds_config),
                        "global_batch": recipe.train.micro_batch_size * recipe.train.grad_accum_steps * world,
                        "recipe": recipe_dict,
                        "tokenizer_fingerprint": tok_fp, "data_fingerprint": train_data.fingerprint,
                        ckpt.UNIVERSAL_INFO: ckpt.universal_info()}
        path = ckpt.save_checkpoint(engine, ckpt_dir, s.step, client_state, recipe.checkpoint.keep_last,
                                    fault=save_faults.save_fault(s.step),
                                    extra_files={"tokenizer.json": tokenizer_json,
                                                 ckpt.STATE: json.dumps({k: v for k, v in client_state.items()
                                                                         if k != "recipe"}, indent=1),
                                                 "recipe.yaml": recipe_to_yaml(recipe)})
        if path is None:
            log.warning("checkpoint at step %d skipped: not enough disk space; the previous one is intact", s.step)
            metrics.event("checkpoint_skipped", step=s.step, reason="disk space")
            return
        metrics.event("checkpoint", step=s.step, path=path, save_s=round(time.time() - started, 3))

    fpt = flops_per_token(n_params - n_embed, recipe.model, recipe.data.seq_len)
    peak = None if on_cpu else device_peak_flops(accel.get_device_name() if hasattr(accel, "get_device_name")
                                                  else torch.cuda.get_device_name())
    def rollback() -> Optional[TrainState]:
        path = ckpt.newest_complete(ckpt_dir)
        if path is None:
            return None
        client = ckpt.load_checkpoint(engine, path)
        return TrainState(step=client["step"], consumed_samples=client["consumed_samples"],
                          guard=client.get("guard", {}))

    objective = None
    if task == "dpo":
        d = recipe.posttrain.dpo
        table = post.reference_table(engine, job, os.path.join(run_dir, "dpo_reference.pt"),
                                     recipe.train.micro_batch_size, fresh=resume_from is None)
        objective = post.dpo_objective(table, d.beta, d.loss, d.label_smoothing)
    trainer = Trainer(engine, recipe, train_data, val_data, metrics, state, save, fpt, peak, rollback, stop,
                      objective)
    if state.step >= recipe.train.max_steps:
        log.info("nothing to do: checkpoint is at step %d, train.max_steps=%d", state.step, recipe.train.max_steps)
    status = trainer.train()
    return {"run_dir": run_dir, "step": state.step, "val_loss": trainer.last_val_loss, "status": status}


def _continue_from(recipe: Recipe, origin: str, tok_fp: str, resume_from: Optional[str]
                   ) -> tuple[Recipe, Optional[GPT]]:
    """Continued pre-training from train.init_from: its architecture and weights; its tokenizer must be the
    recipe's (the prepared data was tokenized with that one)."""
    from llmforge.model.loading import starting_point

    recipe, init_model, init_tok = starting_point(recipe, origin, resume_from)
    if fingerprint(init_tok) != tok_fp:
        raise RecipeError(origin, "train.init_from", f"{recipe.train.init_from} uses tokenizer "
                                                     f"{fingerprint(init_tok)}, the recipe's tokenizer is {tok_fp}; "
                                                     f"point tokenizer.path at the model's tokenizer")
    return recipe, init_model


def _needs_universal(saved: dict, path: str, world: int, stage: int) -> bool:
    """True when the checkpoint was saved at another world size or ZeRO stage: DeepSpeed's sharded files do not fit,
    so it is loaded through a universal checkpoint. Moves DeepSpeed's universal loader cannot make are refused."""
    before_world, before_stage = saved.get("world_size", world), saved.get("zero_stage", stage)
    if before_world == world and before_stage == stage:
        return False
    if (before_stage == 3) != (stage == 3):
        raise CheckpointError(f"{path} was saved under ZeRO-{before_stage}; DeepSpeed's universal loader cannot move "
                              f"it to ZeRO-{stage} (stage 3 <-> 0/1/2). Resume under "
                              f"{'ZeRO-3' if before_stage == 3 else 'ZeRO-1 or 2'}: any world size works there")
    return True


def _check_compatible(client: dict, path: str, tok_fp: str, data_fp: str, allow_data_change: bool) -> None:
    if client.get("tokenizer_fingerprint") not in (None, tok_fp):
        raise CheckpointError(f"{path} was trained with tokenizer {client['tokenizer_fingerprint']}, "
                              f"the recipe's is {tok_fp}")
    if client.get("data_fingerprint") not in (None, data_fp):
        if not allow_data_change:
            raise CheckpointError(f"{path} was trained on data {client['data_fingerprint']}, "
                                  f"the recipe's is {data_fp}; "
                                  f"to continue on the new data pass --set data.allow_fingerprint_change=true")
        log.warning("datasets changed since %s (%s -> %s); continuing from the same sample counter as asked",
                    path, client["data_fingerprint"], data_fp)
