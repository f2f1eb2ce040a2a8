"""DPO's objective: the loss on per-sequence log-probabilities, and the reference log-probabilities it compares
against, computed once from the starting weights and kept in the run directory."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from llmforge.config.parallel import Layout
from llmforge.errors import RecipeError
from llmforge.model.gpt import IGNORE_INDEX
from llmforge.posttrain.data import PreferenceData


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not IGNORE_INDEX, per row (fp32)."""
    nll = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(targets.shape).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
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
    stats = {
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "accuracy": (chosen > rejected).float().mean(),
    }
    return losses.mean(), {k: v.detach() for k, v in stats.items()}


class DPOLoss:
    """Trainer loss over PreferenceData batches; reference[split][k] = (log ref(chosen_k), log ref(rejected_k)) for
    pair k of the batch's split."""

    def __init__(self, reference: dict[str, torch.Tensor], beta: float, loss: str, label_smoothing: float):
        self.reference, self.beta, self.loss, self.label_smoothing = reference, beta, loss, label_smoothing
        self.on_device: dict[str, torch.Tensor] = {}  # each split's table, copied to the device once

    def __call__(self, engine: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = engine.device
        logits, _ = engine(batch["inputs"].to(device, non_blocking=True))
        logps = sequence_logps(logits, batch["targets"].to(device, non_blocking=True))
        n = logps.shape[0] // 2
        if batch["split"] not in self.on_device:
            self.on_device[batch["split"]] = self.reference[batch["split"]].to(device)
        ref = self.on_device[batch["split"]][batch["examples"].to(device, non_blocking=True)]
        return dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], self.beta, self.loss, self.label_smoothing)


@torch.no_grad()
def reference_logps(
    engine: Any, data: PreferenceData, micro_batch: int, layout: Optional[Layout] = None
) -> torch.Tensor:
    """(N, 2) log-probabilities of every pair's chosen and rejected response under the current (= reference)
    weights; each data-parallel replica scores a slice (the ranks of a tensor group score the same rows: their
    inputs must agree), one all-reduce gives every rank the whole table."""
    if layout is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        layout = Layout(world, rank=dist.get_rank() if dist.is_initialized() else 0)
    rank, world = layout.data_rank, layout.data
    table = torch.zeros(data.num_samples, 2, dtype=torch.float32)
    mine = list(range(rank, data.num_samples, world))
    was_training = engine.training
    engine.eval()
    # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
    rounds = -(-data.num_samples // (world * micro_batch))
    for r in range(rounds):
        chunk = mine[r * micro_batch : (r + 1) * micro_batch] or [0]
        batch = data.rows(chunk)
        logits, _ = engine(batch["inputs"].to(engine.device))
        logps = sequence_logps(logits, batch["targets"].to(engine.device)).float().cpu()
        n = len(chunk)
        if mine[r * micro_batch : (r + 1) * micro_batch]:
            table[chunk, 0], table[chunk, 1] = logps[:n], logps[n:]
    if was_training:
        engine.train()
    if not layout.counts_tokens:
        table.zero_()  # one rank per replica contributes its slice to the sum
    if layout.world > 1:
        on_device = table.to(engine.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        table = on_device.cpu()
    return table


def reference_table(
    engine: Any,
    train: PreferenceData,
    val: Optional[PreferenceData],
    path: str,
    micro_batch: int,
    fresh: bool,
    layout: Optional[Layout] = None,
) -> dict[str, Any]:
    """Reference log-probs for the train and val pairs: computed once, from the starting weights, before the first
    step, and kept in the run directory; a resumed run reads them back (its policy is no longer the reference)."""
    key = {"train": train.fingerprint, "val": val.fingerprint if val else None}
    if not fresh:
        if not os.path.isfile(path):
            raise RecipeError(
                "",
                "posttrain",
                f"{path} is missing: the reference log-probs of this DPO run cannot "
                f"be recomputed from a trained policy; start a new run",
            )
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") != key:
            raise RecipeError("", "posttrain.train_file", f"the preference data changed since {path} was computed")
        return cached
    table: dict[str, Any] = {"key": key, "train": reference_logps(engine, train, micro_batch, layout)}
    if val is not None:
        table["val"] = reference_logps(engine, val, micro_batch, layout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(table, path + ".tmp")
        os.replace(path + ".tmp", path)
    return table
