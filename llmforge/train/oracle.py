"""The numerics oracle: a recipe's first steps trained in plain PyTorch, fp32, on one process, with nothing from
DeepSpeed — the reference `llmforge parity --variants` holds every DeepSpeed path (ZeRO stage, precision,
accumulation, layout, checkpointing, compile) to.

What it shares with a run is what defines the model being trained: the recipe, `GPT`, the seeded init
(`seed_everything` then `GPT(...)`, as `run_training` does), the samples of each step (the global batch
consumed .. consumed + global_batch of the same seeded order), the parameter groups (`param_groups`: no decay on
norms, biases, embeddings), the LR schedule (`lr_at`). What it does itself is the optimizer path a run hands to
DeepSpeed: each step's gradient is the mean of its micro-batch losses' gradients over the whole global batch, its
2-norm is taken before clipping, clipping scales by grad_clip / (norm + 1e-6) when the norm is above grad_clip
(PyTorch's and DeepSpeed's rule), and `torch.optim.AdamW` (the plain for-loop implementation, not the fused or
foreach kernels a run uses) takes the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmforge.config import Recipe
from llmforge.data.loader import micro_batch_indices
from llmforge.data.stages import BatchRamp
from llmforge.errors import RecipeError
from llmforge.model import GPT
from llmforge.model.gpt import RouterOutput, document_ids
from llmforge.train.checkpoint import ResumePoint
from llmforge.train.engine import param_groups
from llmforge.train.loading import load_weights
from llmforge.train.run import seed_everything
from llmforge.train.schedule import lr_at
from llmforge.train.task import Task
from llmforge.train.trainer import router_stats


@dataclass
class OracleRun:
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss over the global batch
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> 2-norm of the gradient before clipping


def check_oracle_recipe(recipe: Recipe, origin: str) -> None:
    """What the oracle cannot reproduce, refused in one line: dropout draws differ per rank and per path; it is an
    AdamW step."""
    if recipe.train.optimizer != "adamw":
        raise RecipeError(
            origin, "train.optimizer", f"{recipe.train.optimizer}: the oracle runs AdamW; compare with --layouts"
        )
    if recipe.model.dropout:
        raise RecipeError(
            origin, "model.dropout", f"{recipe.model.dropout}: parity needs 0 (dropout draws differ between runs)"
        )


def oracle_steps(recipe: Recipe, origin: str, steps: int, global_batch: int, micro_batch: int) -> OracleRun:
    """Train `recipe` for `steps` optimizer steps of `global_batch` samples (micro-batches of `micro_batch`) in fp32
    plain PyTorch on this process; the per-step loss and gradient norm."""
    check_oracle_recipe(recipe, origin)
    if global_batch % micro_batch:
        raise ValueError(f"global batch {global_batch} is not a multiple of the micro-batch {micro_batch}")
    task = Task()
    setup = task.setup(recipe, origin, ResumePoint(None), 0)
    recipe, train = setup.recipe, setup.data.train
    t = recipe.train
    warm = t.batch_warmup  # the batch warmup and data stages, as the trainer takes them
    ramp = BatchRamp(global_batch, warm.start, warm.increment, -(-warm.tokens // recipe.data.seq_len))
    task.schedule_data(recipe, setup.data, ramp, origin)
    decay = train.plan.decay_window()
    seed_everything(recipe.run.seed)
    model = GPT(recipe.model)
    if setup.init_weights is not None:
        load_weights(model, setup.init_weights, False)
    model.float().train()
    groups = param_groups(model, t.weight_decay)
    optimizer = torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.betas[0], t.betas[1]), eps=t.eps, foreach=False, fused=False
    )
    params = [p for g in groups for p in g["params"]]
    eos = setup.tokenizer.eos_id if recipe.model.attention_mask == "document" else None
    run = OracleRun()
    consumed = 0
    for step in range(1, steps + 1):
        batch = ramp.batch_at(consumed)
        micros = batch // micro_batch
        lr = lr_at(step - 1, t, decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(micros):
            inputs, targets = train.batch(micro_batch_indices(consumed, m, 0, 1, micro_batch))
            router: list[RouterOutput] = []
            masked = {"documents": document_ids(inputs, eos)} if eos is not None else {}
            _, loss = model(inputs, targets, loss_chunk=t.loss_chunk, z_loss=t.z_loss, router=router, **masked)
            if router:  # an MoE block's auxiliary losses are part of the objective, as the trainer adds them
                loss = loss + router_stats(router)["aux_loss"]
            (loss / micros).backward()
            total += float(loss.detach())
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if t.grad_clip > 0 and norm > t.grad_clip:
            scale = t.grad_clip / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if math.isfinite(norm):
            optimizer.step()
        run.losses[step] = total / micros
        run.grad_norms[step] = norm
        consumed += batch
    return run
