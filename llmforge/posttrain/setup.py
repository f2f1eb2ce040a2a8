"""What SFT and DPO change in a training run: the starting weights and tokenizer (init_from + chat role tokens), the
data (conversations or preference pairs), LoRA, and for DPO the objective with cached reference log-probabilities.
Everything else — engine, schedule, guard, checkpoints, exact resume, preemption — is pre-training's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from llmforge.config import Recipe
from llmforge.errors import RecipeError
from llmforge.model.gpt import GPT
from llmforge.posttrain.data import PreferenceData, SFTData, split_records
from llmforge.tokenizer import Tokenizer
from llmforge.tokenizer.added import with_chat_tokens


@dataclass
class PostTrainJob:
    recipe: Recipe               # with the model section of the starting weights
    tok: Tokenizer               # the base tokenizer plus chat role tokens
    train_data: Any
    val_data: Any
    init_model: Optional[GPT]    # weights to start from (None when resuming: the checkpoint has them)


def prepare(task: str, recipe: Recipe, origin: str, resume_from: Optional[str]) -> PostTrainJob:
    """Validate the posttrain section and build tokenizer, model config, data (and starting weights if fresh)."""
    pt = recipe.posttrain
    if not recipe.train.init_from:
        raise RecipeError(origin, "train.init_from", f"is required for {task}: the model to fine-tune")
    if not pt.train_file:
        raise RecipeError(origin, "posttrain.train_file", f"is required for {task}")
    for key in ("train_file", "val_file"):
        path = getattr(pt, key)
        if path and not os.path.isfile(path):
            raise RecipeError(origin, f"posttrain.{key}", f"file not found: {path}")
    from llmforge.model.loading import starting_point

    recipe, init_model, tok = starting_point(recipe, origin, resume_from, with_chat_tokens)
    train_records, val_records = split_records(pt.train_file, pt.val_file, pt.val_fraction)
    kind = PreferenceData if task == "dpo" else SFTData
    train = kind(train_records, tok, recipe.data.seq_len, recipe.run.seed, "train")
    val = kind(val_records, tok, recipe.data.seq_len, recipe.run.seed + 1, "val") if val_records else None
    return PostTrainJob(recipe, tok, train, val, init_model)


def load_weights(model: GPT, source: GPT, zero3: bool) -> None:
    """Copy `source`'s weights into the (possibly ZeRO-3 partitioned) freshly built model."""
    state = source.state_dict()
    if not zero3:
        model.load_state_dict(state)
        return
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])


# -- DPO ---------------------------------------------------------------------------------------------------------

def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not -100, per row (fp32)."""
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                            reduction="none")
    return -nll.view(targets.shape).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al., 2023) with optional label smoothing (cDPO), or IPO (Azar et al., 2023), on per-sequence
    log-probabilities. Rewards are beta·(log pi - log ref)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        logsig = torch.nn.functional.logsigmoid
        losses = -(1.0 - label_smoothing) * logsig(beta * h) - label_smoothing * logsig(-beta * h)
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    stats = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
             "reward_margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).float().mean()}
    return losses.mean(), {k: v.detach() for k, v in stats.items()}


def dpo_objective(reference: dict[str, torch.Tensor], beta: float, loss: str, label_smoothing: float):
    """Trainer objective over PreferenceData batches; reference[split][k] = (log ref(chosen_k), log ref(rejected_k))
    for pair k of the batch's split."""

    on_device: dict[str, torch.Tensor] = {}  # each split's table, copied to the device once

    def objective(engine: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = engine.device
        logits, _ = engine(batch["inputs"].to(device, non_blocking=True))
        logps = sequence_logps(logits, batch["targets"].to(device, non_blocking=True))
        n = logps.shape[0] // 2
        if batch["split"] not in on_device:
            on_device[batch["split"]] = reference[batch["split"]].to(device)
        ref = on_device[batch["split"]][batch["examples"].to(device, non_blocking=True)]
        return dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], beta, loss, label_smoothing)

    return objective


@torch.no_grad()
def reference_logps(engine: Any, data: PreferenceData, micro_batch: int) -> torch.Tensor:
    """(N, 2) log-probabilities of every pair's chosen and rejected response under the current (= reference)
    weights; each rank scores a slice, one all-reduce gives every rank the whole table."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    table = torch.zeros(data.num_samples, 2, dtype=torch.float32)
    mine = list(range(rank, data.num_samples, world))
    was_training = engine.training
    engine.eval()
    # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
    rounds = -(-data.num_samples // (world * micro_batch))
    for r in range(rounds):
        chunk = mine[r * micro_batch:(r + 1) * micro_batch] or [0]
        batch = data.rows(chunk)
        logits, _ = engine(batch["inputs"].to(engine.device))
        logps = sequence_logps(logits, batch["targets"].to(engine.device)).float().cpu()
        n = len(chunk)
        if mine[r * micro_batch:(r + 1) * micro_batch]:
            table[chunk, 0], table[chunk, 1] = logps[:n], logps[n:]
    if was_training:
        engine.train()
    if world > 1:
        on_device = table.to(engine.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        table = on_device.cpu()
    return table


def reference_table(engine: Any, job: PostTrainJob, path: str, micro_batch: int, fresh: bool
                    ) -> dict[str, torch.Tensor]:
    """Reference log-probs for the train and val pairs: computed once, from the starting weights, before the first
    step, and kept in the run directory; a resumed run reads them back (its policy is no longer the reference)."""
    import torch.distributed as dist

    key = {"train": job.train_data.fingerprint, "val": job.val_data.fingerprint if job.val_data else None}
    if not fresh:
        if not os.path.isfile(path):
            raise RecipeError("", "posttrain", f"{path} is missing: the reference log-probs of this DPO run cannot "
                                               f"be recomputed from a trained policy; start a new run")
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") != key:
            raise RecipeError("", "posttrain.train_file", f"the preference data changed since {path} was computed")
        return cached
    table = {"key": key, "train": reference_logps(engine, job.train_data, micro_batch)}
    if job.val_data is not None:
        table["val"] = reference_logps(engine, job.val_data, micro_batch)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(table, path + ".tmp")
        os.replace(path + ".tmp", path)
    return table
