"""`run_training()`: recipe → validated inputs → DeepSpeed engine → resume → Trainer, the same for every task
(llmforge/train/task.py says what differs). Nothing is written until every user-fixable problem (recipe, DeepSpeed
JSON, tokenizer, data, --resume path) has been checked."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from llmforge import allocator
from llmforge.config import Recipe, load_recipe, recipe_to_yaml
from llmforge.config.deepspeed import compose_ds_config, resolve_precision, zero_stage
from llmforge.config.parallel import check_layout, make_layout, ranks_per_node, resolve_batch
from llmforge.data.stages import batch_ramp, check_batch_ramp
from llmforge.errors import RecipeError, UserError
from llmforge.model import compile_unavailable
from llmforge.model.flops import device_peak_flops, flops_per_token, inactive_params
from llmforge.model.wraps import fp8_problem
from llmforge.tokenizer import fingerprint
from llmforge.train.checkpoint import Checkpointer, RunIdentity, check_resume, resolve_resume
from llmforge.train.checkpoint_files import read_state
from llmforge.train.distributed import port_in_use, port_in_use_line, release_shm_segment, setup_env, stale_build_locks
from llmforge.train.engine import build_engine, build_model
from llmforge.train.guard import FaultInjector, StopSignal
from llmforge.train.loading import load_weights
from llmforge.train.metrics import Metrics, attach_log_files, record_error
from llmforge.train.task import Task
from llmforge.train.trainer import Trainer, TrainerConfig

log = logging.getLogger("llmforge")


def run_training(
    recipe_path: str, overrides: Optional[list[str]] = None, resume: str = "auto", task: Optional[Task] = None
) -> dict:
    """Train `task` (pre-training by default) from a recipe; returns a summary (run dir, step, last val loss,
    status 'finished' or 'preempted')."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    stop = StopSignal()  # first: a preemption signal during start-up must not kill the process
    setup_env()
    task = task or Task()
    recipe = load_recipe(recipe_path, overrides)
    world, accel = int(os.environ["WORLD_SIZE"]), get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    layout = make_layout(recipe, world, int(os.environ["RANK"]), recipe_path)
    recipe, precision_note = resolve_precision(recipe, on_cpu)
    if precision_note and layout.rank == 0:
        log.log(logging.WARNING if "emulated, about" in precision_note else logging.INFO, precision_note)
    point = resolve_resume(resume, recipe.checkpoint_dir)
    saved = read_state(point.path) if point.path else {}
    recipe = resolve_batch(recipe, layout.data, recipe_path, saved.get("global_batch"))
    ds_config = compose_ds_config(recipe, layout.data, recipe.run_dir, recipe_path, on_cpu)
    stage = zero_stage(ds_config)
    check_device(recipe, recipe_path, on_cpu)
    setup = task.setup(recipe, recipe_path, point, stage)
    recipe, tok, data = setup.recipe, setup.tokenizer, setup.data
    check_layout(recipe, world, stage, recipe_path, ranks_per_node())  # on the model the task resolved
    if problem := check_batch_ramp(recipe.train, recipe.data.seq_len, layout.data):
        raise RecipeError(recipe_path, "train.batch_warmup", problem)
    data_order = task.schedule_data(
        recipe, data, batch_ramp(recipe.train, recipe.data.seq_len, layout.data), recipe_path
    )
    lora = task.lora(recipe)
    check_fp8(recipe, recipe_path, layout.tensor, lora.rank)
    check_moe(recipe, recipe_path)
    universal = check_resume(
        point,
        fingerprint(tok),
        data.train.fingerprint,
        recipe.data.allow_fingerprint_change,
        layout,
        stage,
        data_order,
    )
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    for lock in stale_build_locks():  # before DeepSpeed loads its CPU comm op, which would wait on it forever
        log.warning(
            "%s is %.0f min old: a JIT build killed mid-way leaves it, and DeepSpeed then waits on it "
            "forever; delete it if no build is running",
            lock,
            (time.time() - os.path.getmtime(lock)) / 60,
        )
    if problem := port_in_use():
        raise UserError(problem)
    try:
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    except torch.distributed.DistNetworkError as e:  # taken between the check and the bind
        if "EADDRINUSE" not in str(e):
            raise
        raise UserError(port_in_use_line()) from None
    release_shm_segment()
    seed_everything(recipe.run.seed)
    model = build_model(recipe, ds_config)
    if setup.init_weights is not None:
        load_weights(model, setup.init_weights, stage == 3)
        setup.init_weights = None
    n_params, n_embed = count_parameters(model)
    inactive = inactive_params(recipe.model)
    ckpt, faults = recipe.model.activation_checkpointing, FaultInjector.from_env()
    built = build_engine(model, ds_config, layout, recipe.train, ckpt, lora, faults)
    engine, ds_config, n_params = built.engine, built.config, n_params + built.adapters
    if built.adapters:
        log.info("LoRA rank %d on %s: %d trainable parameters", lora.rank, ",".join(lora.targets), built.adapters)
    if engine.global_rank == 0:
        write_run_files(recipe, ds_config)
    attach_log_files(recipe.run_dir, engine.global_rank)
    if (small_val := val_warning(recipe, data.val, layout.data)) and layout.rank == 0:
        log.warning(small_val)
    if engine.global_rank == 0:
        sizes = f"{n_params / 1e6:.2f}M parameters ({(n_params - n_embed) / 1e6:.2f}M non-embedding"
        if inactive:
            sizes += f", {(n_params - inactive) / 1e6:.2f}M active per token"
        sizes += ")"
        log.info(
            "model: %s, %d ranks (%s), ZeRO stage %d, %s on %s",
            sizes,
            world,
            layout.describe(),
            stage,
            recipe.train.precision,
            accel.device_name(),
        )
        log.info(allocator.describe())
    metrics = Metrics(recipe.run_dir, engine.global_rank == 0, recipe.logging.tensorboard)
    try:
        order = {"data_order": data_order(None)} if data_order is not None else {}
        plan = getattr(data.train, "plan", None)
        decay = plan.decay_window() if plan is not None else None
        identity = RunIdentity(recipe, tok, data.train.fingerprint, layout, stage, order, decay)
        checkpointer = Checkpointer(recipe.checkpoint_dir, recipe.checkpoint.keep_last, identity, metrics, faults)
        state = checkpointer.resume(engine, point, universal)
        objective = task.objective(engine, setup, recipe.run_dir, layout, fresh=point.path is None)
        fpt = flops_per_token(n_params - n_embed - inactive, recipe.model, recipe.data.seq_len)
        cfg = TrainerConfig.from_recipe(recipe, layout, fpt, None if on_cpu else peak_flops(accel), faults)
        trainer = Trainer(engine, cfg, data, objective, checkpointer, metrics)
        if state.step >= recipe.train.max_steps:
            log.info("nothing to do: checkpoint is at step %d, train.max_steps=%d", state.step, recipe.train.max_steps)
        status = trainer.train(state, stop)
    except BaseException as e:  # the error the run ends with, in the run directory's log files too
        record_error(e)
        raise
    finally:
        metrics.close()
    return {"run_dir": recipe.run_dir, "step": state.step, "val_loss": trainer.last_val_loss, "status": status}


def val_warning(recipe: Recipe, val: Any, replicas: int) -> Optional[str]:
    """A warning when evaluation reads more val samples than the split holds (it then scores the same samples
    several times, and its loss is noisier than eval.batches suggests), else None."""
    reads = recipe.eval.batches * recipe.train.micro_batch_size * replicas
    have = 0 if val is None else val.num_samples
    if not recipe.eval.interval or have == 0 or have >= reads:
        return None
    return (
        f"the val split holds {have} samples of data.seq_len+1 tokens, and each evaluation reads eval.batches x "
        f"train.micro_batch_size x {replicas} data-parallel replicas = {reads}: it repeats samples; raise "
        f"data.val_fraction (and prepare again) or lower eval.batches"
    )


def setup_logging() -> None:
    """INFO on rank 0, warnings elsewhere."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("llmforge").setLevel(level)


def check_device(recipe: Recipe, origin: str, on_cpu: bool) -> None:
    """What the recipe asks of the device, checked before anything starts."""
    if recipe.train.precision == "fp16" and on_cpu:
        raise RecipeError(origin, "train.precision", "fp16 needs a GPU; use bf16 or fp32 on CPU")
    if recipe.train.compile and (problem := compile_unavailable(on_cpu)):
        raise RecipeError(origin, "train.compile", f"{problem}; or set train.compile: false")


def check_fp8(recipe: Recipe, origin: str, tensor: int, lora_rank: int) -> None:
    """What train.fp8 needs, checked before anything starts."""
    if not recipe.train.fp8.enabled:
        return
    key = "train.fp8.scaling"
    if tensor > 1:
        raise RecipeError(origin, key, "FP8 with parallel.tensor > 1: AutoTP shards the layers FP8 replaces; use 1")
    if lora_rank:
        raise RecipeError(origin, key, "FP8 with LoRA adapters is not supported; set posttrain.lora.rank: 0")
    m = recipe.model
    if problem := fp8_problem(m.d_model, m.ff_dim, m.kv_heads * m.head_dim):
        raise RecipeError(origin, key, problem)
    if importlib.util.find_spec("torchao") is None:
        raise RecipeError(origin, key, "FP8 training needs torchao: pip install torchao")


def check_moe(recipe: Recipe, origin: str) -> None:
    """What a mixture-of-experts model cannot be trained with yet, checked before anything starts."""
    if not recipe.model.moe.enabled:
        return
    if recipe.train.optimizer == "muon":
        raise RecipeError(
            origin, "train.optimizer", "Muon is not set up for stacked expert weights (model.moe); use adamw"
        )
    if recipe.train.compile:
        raise RecipeError(
            origin, "train.compile", "torch.compile is not yet checked on mixture-of-experts blocks; set it to false"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_flops(accel: Any) -> Optional[float]:
    """The device's bf16 peak FLOP/s, for MFU (None when unknown)."""
    name = accel.get_device_name() if hasattr(accel, "get_device_name") else torch.cuda.get_device_name()
    return device_peak_flops(name)


def _numel(p: Any) -> int:
    return getattr(p, "ds_numel", p.numel())  # the full size of a ZeRO-3 partitioned parameter


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, embedding parameters), at full size under ZeRO-3 partitioning."""
    total = sum(_numel(p) for p in model.parameters())
    embed = sum(_numel(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return total, embed


def write_run_files(recipe: Recipe, ds_config: dict) -> None:
    """The resolved recipe and composed DeepSpeed config, beside the run's metrics."""
    os.makedirs(recipe.run_dir, exist_ok=True)
    with open(os.path.join(recipe.run_dir, "recipe.resolved.yaml"), "w", encoding="utf-8") as f:
        f.write(recipe_to_yaml(recipe))
    with open(os.path.join(recipe.run_dir, "ds_config.json"), "w", encoding="utf-8") as f:
        json.dump(ds_config, f, indent=2)
