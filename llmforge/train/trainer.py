"""The training loop: `Trainer.train()` runs `train_step()` and small side effects (log, eval, checkpoint)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from llmforge.config.recipe import Recipe
from llmforge.data.loader import PretrainData, micro_batch_indices
from llmforge.train.distributed import mean_across_ranks
from llmforge.train.metrics import Metrics, memory_gb
from llmforge.train.schedule import lr_at


@dataclass
class TrainState:
    step: int = 0               # optimizer steps completed
    consumed_samples: int = 0   # global samples consumed (the data position)


class Trainer:
    def __init__(self, engine: Any, recipe: Recipe, train_data: PretrainData, val_data: Optional[PretrainData],
                 metrics: Metrics, state: TrainState, save_fn: Callable[[TrainState], None],
                 flops_per_token: float, peak_flops: Optional[float]):
        self.engine, self.recipe, self.metrics, self.state = engine, recipe, metrics, state
        self.train_data, self.val_data, self.save_fn = train_data, val_data, save_fn
        self.rank, self.world = engine.global_rank, engine.world_size
        t = recipe.train
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * self.world
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.last_val_loss: Optional[float] = None

    # -- the step -------------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum_steps micro-batches; returns (this rank's mean loss, lr)."""
        t, engine = self.recipe.train, self.engine
        lr = lr_at(self.state.step, t)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=engine.device)
        for micro in range(t.grad_accum_steps):
            indices = micro_batch_indices(self.state.consumed_samples, micro, self.rank, self.world,
                                          t.micro_batch_size)
            inputs, targets = self.train_data.batch(indices)
            _, loss = engine(inputs.to(engine.device), targets.to(engine.device))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        self.state.step += 1
        self.state.consumed_samples += self.global_batch
        return total / t.grad_accum_steps, lr

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> None:
        r = self.recipe
        if self.state.step == 0 and r.eval.interval and r.eval.at_start:
            self.evaluate()
        window_start, window_steps = time.time(), 0
        run_start, run_start_step = time.time(), self.state.step
        while self.state.step < r.train.max_steps:
            loss, lr = self.train_step()
            window_steps += 1
            step = self.state.step
            last = step == r.train.max_steps
            if step % r.logging.interval == 0 or last:
                now = time.time()
                self.log(step, loss, lr, now - window_start, window_steps,
                         (now - run_start) / max(1, step - run_start_step))
                window_start, window_steps = time.time(), 0
            if r.eval.interval and (step % r.eval.interval == 0 or last):
                self.evaluate()
            if (r.checkpoint.interval and step % r.checkpoint.interval == 0) or last:
                self.save_fn(self.state)

    def log(self, step: int, loss: torch.Tensor, lr: float, elapsed: float, steps: int, s_per_step: float) -> None:
        tokens_per_s = self.tokens_per_step * steps / max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world)
        self.metrics.train({
            "step": step, "tokens": self.state.consumed_samples * self.recipe.data.seq_len,
            "loss": mean_across_ranks(loss), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_s, "mfu": mfu, "mem_gb": memory_gb(),
            "eta_s": s_per_step * (self.recipe.train.max_steps - step),
        })

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean val loss over eval.batches micro-batches per rank (a fixed set of val samples)."""
        if self.val_data is None or self.val_data.num_samples == 0:
            return None
        engine, mb = self.engine, self.recipe.train.micro_batch_size
        engine.eval()
        total = torch.zeros((), device=engine.device)
        for b in range(self.recipe.eval.batches):
            inputs, targets = self.val_data.batch(micro_batch_indices(0, b, self.rank, self.world, mb))
            _, loss = engine(inputs.to(engine.device), targets.to(engine.device))
            total += loss.float()
        engine.train()
        val_loss = mean_across_ranks(total / self.recipe.eval.batches)
        self.last_val_loss = val_loss
        self.metrics.eval({"step": self.state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        return val_loss
