"""Compose the one DeepSpeed config a run uses: plain `ds_configs/*.json` + overrides + what the recipe owns.

Only values that must agree with the recipe are derived here (batch sizes, clipping, precision, optimizer
hyper-parameters, monitor paths); everything else stays DeepSpeed's own JSON, untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from llmforge.config.loader import deep_merge
from llmforge.config.recipe import Recipe, TrainConfig
from llmforge.errors import RecipeError

CPUINFO = "/proc/cpuinfo"


def cpu_bf16_features() -> list[str]:
    """The CPU features that compute bf16 natively, from /proc/cpuinfo (x86: avx512_bf16, amx_bf16; Arm: bf16);
    empty where bf16 is emulated (or the file does not exist)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            words = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return []
    return sorted(words & {"avx512_bf16", "amx_bf16", "bf16"})


def auto_precision(on_cpu: bool) -> tuple[Literal["bf16", "fp16", "fp32"], str]:
    """(precision, why) for train.precision: auto: bf16 where the hardware computes it natively (a CUDA GPU with
    bf16, a CPU with AVX512-BF16/AMX or Arm BF16), fp16 on an older GPU, fp32 on any other CPU (emulated bf16 there
    took 2.3x the time of fp32 on the demo recipe)."""
    if not on_cpu:  # planning or submitting from a host without GPUs: the GPUs are assumed to have bf16
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "fp16", "the GPU has no bf16"
        return "bf16", "the GPU computes bf16"
    features = cpu_bf16_features()
    if features:
        return "bf16", f"this CPU computes bf16 natively ({', '.join(features)})"
    return "fp32", "this CPU has no native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): bf16 would be emulated"


def resolve_precision(recipe: Recipe, on_cpu: bool) -> tuple[Recipe, str]:
    """The recipe with train.precision: auto made concrete, and a line to log ('' when nothing is worth saying): the
    choice and why, or a warning that an explicit bf16 is emulated on this CPU."""
    t = recipe.train
    if t.precision == "auto":
        precision, why = auto_precision(on_cpu)
        train = dataclasses.replace(t, precision=precision)
        return dataclasses.replace(recipe, train=train), f"train.precision auto: {precision} ({why})"
    if t.precision == "bf16" and on_cpu and not cpu_bf16_features():
        return recipe, (
            "train.precision bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): it is "
            "emulated, about 2.3x the time of fp32 on the demo recipe; train.precision: auto picks fp32 here"
        )
    return recipe, ""


def read_ds_json(path: str, origin: str) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(origin, "deepspeed.config", f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise RecipeError(origin, "deepspeed.config", f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise RecipeError(origin, "deepspeed.config", f"{path}: must hold a JSON object")
    return data


def _agree(cfg: dict, key: str, value: Any, origin: str, source: str) -> None:
    """Set cfg[key] = value, refusing a conflicting explicit value from the JSON or overrides."""
    given = cfg.get(key, "auto")
    if given not in ("auto", None) and given != value:
        raise RecipeError(
            origin,
            source,
            f"{key}={given} disagrees with the recipe, which gives {value}; remove it or make them agree",
        )
    cfg[key] = value


def compose_ds_config(recipe: Recipe, world_size: int, run_dir: str, origin: str, on_cpu: bool) -> dict:
    """The full DeepSpeed config for `recipe` on `world_size` ranks (data-parallel replicas: world ÷ the recipe's
    tensor × sequence)."""
    recipe, _ = resolve_precision(recipe, on_cpu)
    base = read_ds_json(recipe.deepspeed.config, origin)
    cfg = deep_merge(base, recipe.deepspeed.overrides)
    source = "deepspeed.overrides" if recipe.deepspeed.overrides else "deepspeed.config"
    t = recipe.train

    _agree(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, origin, source)
    _agree(cfg, "gradient_accumulation_steps", t.grad_accum_steps, origin, source)
    if recipe.parallel.model_parallel == 1:
        _agree(cfg, "train_batch_size", t.global_batch(world_size), origin, source)
    elif cfg.pop("train_batch_size", "auto") not in ("auto", None):
        # DeepSpeed counts every rank of a sequence group as data-parallel and sizes batches before AutoTP forms
        # its groups; given micro-batch and accumulation it derives its own figure (llmforge's global batch is
        # micro x accumulation x data-parallel replicas, TrainConfig.global_batch).
        raise RecipeError(
            origin, source, "train_batch_size: with parallel.tensor or parallel.sequence > 1 it is derived; remove it"
        )
    _agree(cfg, "gradient_clipping", t.grad_clip, origin, source)
    if problem := refused_stage(zero_stage(cfg), t.precision):
        raise RecipeError(origin, source, problem)

    cfg["bf16"] = deep_merge(cfg.get("bf16", {}), {"enabled": t.precision == "bf16"})
    fp16: dict[str, Any] = {"enabled": t.precision == "fp16"}
    if t.precision == "fp16":
        fp16 = {
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
            **fp16,
        }
    cfg["fp16"] = deep_merge(cfg.get("fp16", {}), fp16)

    if "scheduler" in cfg:
        raise RecipeError(origin, source, "scheduler: llmforge computes the LR schedule (train.schedule); remove it")
    if t.optimizer == "muon":
        # llmforge builds Muon itself (train/run.py: optimizer_args) with its own parameter groups
        if "optimizer" in cfg:
            raise RecipeError(origin, source, "optimizer: train.optimizer is muon, which llmforge builds; remove it")
        if problem := refused_muon(zero_stage(cfg), t.grad_clip):
            raise RecipeError(origin, "train.optimizer", problem)
    else:
        _adamw_section(cfg, t, on_cpu)

    # llmforge writes TensorBoard itself (<run>/tensorboard, logging.tensorboard): DeepSpeed's monitor would add a
    # second series of the same quantities (Train/Samples/lr, .../train_loss)
    cfg["tensorboard"] = {"enabled": False}
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer (on by default, synchronized) waits for the device at every forward and every
    # engine.step(): two host waits per micro-batch, for a figure llmforge measures itself. Off unless asked for.
    cfg.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    return cfg


def refused_stage(stage: int, precision: str) -> str:
    """Why llmforge refuses this ZeRO stage with this precision ('' when it runs). ZeRO-0 with bf16/fp16 goes
    through DeepSpeed's fp16 optimizer wrapper (FP16_Optimizer / FP16_UnfusedOptimizer, the only path without
    ZeRO), whose constructor runs one optimizer step on zero gradients to create the Adam state: Adam's step count
    starts at 1, so every later update has the wrong bias correction (the first is 0.735x its size at betas
    0.9/0.95), and AdamW decays every weight once at the peak LR. The run trains another model (docs/training.md,
    "Numerics"); ZeRO-1 holds the same memory on one GPU and less on several."""
    if stage == 0 and precision in ("bf16", "fp16"):
        return (
            f"zero_optimization.stage 0 with train.precision {precision} trains another model (DeepSpeed's "
            "fp16/bf16 optimizer wrapper takes an AdamW step on zero gradients at start); use "
            "deepspeed.config: llmforge:zero1.json (the same memory on one GPU) or train.precision: fp32"
        )
    return ""


def refused_muon(stage: int, grad_clip: float) -> str:
    """Why Muon is refused with this ZeRO stage and clipping ('' when it runs). DeepSpeed 0.19.8 applies Muon's
    Newton-Schulz inside the ZeRO-1/2 gradient partitions before clipping, so gradient_clipping clips the
    orthogonalized update (its norm grows with the model: ~24 for the test model) and shrinks every step by that
    factor (DeepSpeed #8439, measured here: docs/training.md); ZeRO-3 runs Muon on every micro-batch (#8443)."""
    if stage == 3:
        return "muon under ZeRO-3 (DeepSpeed 0.19.8 orthogonalizes each micro-batch there, #8443); use zero1 or zero2"
    if stage in (1, 2) and grad_clip > 0:
        return (
            f"muon under ZeRO-{stage} with train.grad_clip {grad_clip}: DeepSpeed clips Muon's orthogonalized update, "
            "not the gradient (#8439), shrinking every step; set train.grad_clip: 0 (or use zero0.json in fp32)"
        )
    return ""


def _adamw_section(cfg: dict, t: TrainConfig, on_cpu: bool) -> None:
    """The optimizer section: AdamW with the recipe's hyper-parameters (DeepSpeed builds it)."""
    optimizer = cfg.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    params.update({"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay})
    zero = cfg.get("zero_optimization", {})
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if on_cpu and not offloaded and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        # DeepSpeed's FusedAdam needs CUDA (and is its default there); on CPU torch's AdamW, with its fused kernel
        # (one pass over each flat fp32 partition: 4.4 -> 3.7 ms per step at 0.8M parameters, measured)
        params.setdefault("torch_adam", True)
        params.setdefault("fused", True)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
