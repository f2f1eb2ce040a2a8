"""The training loop: `Trainer.train()` runs `train_step()` and small side effects (log, eval, checkpoint, guard,
preemption)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from llmforge.config.recipe import Recipe
from llmforge.data.loader import micro_batch_indices
from llmforge.data.prefetch import Prefetcher
from llmforge.train.guard import FaultInjector, SpikeGuard, StopSignal
from llmforge.train.metrics import Metrics, memory_gb
from llmforge.train.schedule import lr_at


@dataclass
class TrainState:
    step: int = 0               # optimizer steps completed (skipped steps included)
    consumed_samples: int = 0   # global samples consumed (the data position)
    guard: dict = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float                 # mean over micro-batches and ranks
    lr: float
    skipped: Optional[str]      # why the optimizer step was skipped, or None
    stop: bool                  # a rank received a stop signal
    stats: dict = field(default_factory=dict)  # the objective's own metrics (DPO rewards, ...), mean over ranks


Objective = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def lm_objective(z_loss: float = 0.0, loss_chunk: int = 0) -> Objective:
    """Next-token cross-entropy on (inputs, targets) batches (targets -100 carry no loss), plus optional z-loss;
    loss_chunk > 0 computes the LM head and loss that many tokens at a time (see GPT.forward)."""

    def objective(engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch
        _, loss = engine(inputs.to(engine.device, non_blocking=True), targets.to(engine.device, non_blocking=True),
                         loss_chunk=loss_chunk, z_loss=z_loss)
        return loss, {}

    return objective


class Trainer:
    def __init__(self, engine: Any, recipe: Recipe, train_data: Any, val_data: Optional[Any],
                 metrics: Metrics, state: TrainState, save_fn: Callable[[TrainState], None],
                 flops_per_token: float, peak_flops: Optional[float],
                 rollback_fn: Optional[Callable[[], Optional[TrainState]]] = None,
                 stop: Optional[StopSignal] = None, objective: Optional[Objective] = None):
        self.engine, self.recipe, self.metrics, self.state = engine, recipe, metrics, state
        self.train_data, self.val_data, self.save_fn, self.rollback_fn = train_data, val_data, save_fn, rollback_fn
        self.rank, self.world = engine.global_rank, engine.world_size
        t = recipe.train
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * self.world
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.guard = SpikeGuard(t.spike_guard)
        self.guard.load_state_dict(state.guard)
        self.stop = stop or StopSignal()
        self.faults = FaultInjector()
        self.objective = objective or lm_objective(t.z_loss, t.loss_chunk)
        self.eval_objective = objective or lm_objective(0.0, t.loss_chunk)
        self.last_val_loss: Optional[float] = None
        device = torch.device(engine.device)
        self.batches = Prefetcher(self._read_micro, self._next_micro, recipe.data.prefetch,
                                  device if device.type == "cuda" else None)

    # -- the step -------------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum_steps micro-batches.

        Before the last backward, one all-reduce gives every rank the step's mean loss (and the objective's metrics)
        and any stop signal. A step whose loss is non-finite or a spike is skipped through DeepSpeed's own overflow
        check: the last backward carries NaN, so the whole accumulated gradient is dropped and neither weights nor
        optimizer state change. That decision is taken on the device, so the host never waits for the GPU inside the
        step: the all-reduced values travel to the host behind the forward and are read once the optimizer step is
        queued (on GPU, the next micro-batch's input copy does not wait either: see data.prefetch).
        """
        t, engine = self.recipe.train, self.engine
        step = self.state.step + 1
        lr = lr_at(self.state.step, t)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=engine.device)
        stat_totals: dict[str, torch.Tensor] = {}
        skipped_before = engine.skipped_steps
        n = t.grad_accum_steps
        for micro in range(n):
            loss, stats = self.objective(engine, self.batches.get((self.state.consumed_samples, micro)))
            loss = self.faults.loss(step, loss)
            total += loss.detach().float()
            for k, v in stats.items():
                stat_totals[k] = stat_totals.get(k, 0.0) + v.detach().float()
            if micro == n - 1:
                packed = self._reduce(total / n, {k: v / n for k, v in stat_totals.items()})
                rejected = self.guard.reject(packed[0])
                if rejected is not None:
                    loss = loss * torch.where(rejected, float("nan"), 1.0)
                    packed = torch.cat([packed, rejected.float().reshape(1)])
                values = _HostCopy(packed)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        host = values.get()
        mean_loss, stop = host[0], host[1] > 0
        means = {k: host[2 + i] for i, k in enumerate(stat_totals)}
        skipped = self.guard.reason(mean_loss) if rejected is not None and host[-1] > 0 else None
        if engine.skipped_steps > skipped_before and skipped is None:
            skipped = "non_finite_grad"  # finite loss, but DeepSpeed found inf/NaN gradients
        self.state.step = step
        self.state.consumed_samples += self.global_batch
        return StepResult(mean_loss, lr, skipped, stop, means)

    def _next_micro(self, key: tuple[int, int]) -> tuple[int, int]:
        consumed, micro = key
        return (consumed, micro + 1) if micro + 1 < self.recipe.train.grad_accum_steps else \
            (consumed + self.global_batch, 0)

    def _read_micro(self, key: tuple[int, int]) -> Any:
        consumed, micro = key
        return self.train_data.batch(micro_batch_indices(consumed, micro, self.rank, self.world,
                                                         self.recipe.train.micro_batch_size))

    def _reduce(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """[mean loss over ranks, number of ranks asked to stop, mean of each objective metric] on the device,
        all-reduced without waiting for the result."""
        flag = 1.0 if self.stop.requested else 0.0
        packed = torch.stack([loss.detach().float(), torch.full((), flag, device=loss.device),
                              *[v.reshape(()).float().to(loss.device) for v in stats.values()]])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed[0] /= self.world
        packed[2:] /= self.world
        return packed

    def _agree(self, loss: torch.Tensor, stats: Optional[dict[str, torch.Tensor]] = None
               ) -> tuple[float, bool, dict[str, float]]:
        """One all-reduce: (mean loss over ranks, any rank asked to stop, mean of each objective metric)."""
        stats = stats or {}
        host = self._reduce(loss, stats).tolist()
        return host[0], host[1] > 0, {k: host[2 + i] for i, k in enumerate(stats)}

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> str:
        """Train to max_steps; returns 'finished' or 'preempted' (a checkpoint was saved first)."""
        try:
            return self._train()
        finally:
            self.batches.close()

    def _train(self) -> str:
        r = self.recipe
        if self.state.step == 0 and r.eval.interval and r.eval.at_start:
            self.evaluate()
        window_start, window_steps = time.time(), 0
        run_start, run_start_step = time.time(), self.state.step
        while self.state.step < r.train.max_steps:
            result = self.train_step()
            window_steps += 1
            step = self.state.step
            last = step == r.train.max_steps
            if result.skipped:
                self.metrics.event("skipped_step", step=step, reason=result.skipped, loss=_json_float(result.loss))
            if self.guard.record(step, result.loss, result.skipped is not None) and self._rollback(step):
                continue
            self.state.guard = self.guard.state_dict()
            if step % r.logging.interval == 0 or last:
                now = time.time()
                self.log(step, result, now - window_start, window_steps,
                         (now - run_start) / max(1, step - run_start_step))
                window_start, window_steps = time.time(), 0
            if r.eval.interval and (step % r.eval.interval == 0 or last):
                self.evaluate()
            if result.stop:
                return self._preempt()
            if (r.checkpoint.interval and step % r.checkpoint.interval == 0) or last:
                self.save_fn(self.state)
        return "finished"

    def _rollback(self, step: int) -> bool:
        """Persistent divergence: reload the newest complete checkpoint, keep the data position (so the window that
        caused it is skipped), and go on. False when there is no checkpoint to go back to."""
        restored = self.rollback_fn() if self.rollback_fn else None
        if restored is None:
            self.metrics.event("rollback_unavailable", step=step, reason="no complete checkpoint")
            self.guard.reset_bad()
            return False
        skipped = self.state.consumed_samples - restored.consumed_samples
        self.metrics.event("rollback", step=step, to_step=restored.step, skipped_samples=skipped)
        self.state.step = restored.step
        self.guard.load_state_dict(restored.guard)
        self.guard.reset_bad()
        self.state.guard = self.guard.state_dict()
        return True

    def _preempt(self) -> str:
        started = time.time()
        self.save_fn(self.state)
        since = (time.time() - self.stop.received_at) if self.stop.received_at else None
        self.metrics.event("preempted", step=self.state.step, signal=self.stop.signum,
                           save_s=round(time.time() - started, 3),
                           signal_to_saved_s=None if since is None else round(since, 3))
        return "preempted"

    def log(self, step: int, result: StepResult, elapsed: float, steps: int, s_per_step: float) -> None:
        tokens_per_s = self.tokens_per_step * steps / max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world)
        self.metrics.train({
            "step": step, "tokens": self.state.consumed_samples * self.recipe.data.seq_len,
            "loss": _json_float(result.loss), "lr": result.lr,
            "grad_norm": None if grad_norm is None else _json_float(float(grad_norm)),
            "tokens_per_s": tokens_per_s, "mfu": mfu, "mem_gb": memory_gb(),
            "eta_s": s_per_step * (self.recipe.train.max_steps - step),
            **{k: _json_float(v) for k, v in result.stats.items()},
        })

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean val loss (and objective metrics, prefixed val_) over eval.batches micro-batches per rank, always the
        same val samples."""
        if self.val_data is None or self.val_data.num_samples == 0:
            return None
        engine, mb = self.engine, self.recipe.train.micro_batch_size
        engine.eval()
        total = torch.zeros((), device=engine.device)
        stat_totals: dict[str, torch.Tensor] = {}
        for b in range(self.recipe.eval.batches):
            loss, stats = self.eval_objective(engine, self.val_data.batch(micro_batch_indices(0, b, self.rank,
                                                                                               self.world, mb)))
            total += loss.float()
            for k, v in stats.items():
                stat_totals[k] = stat_totals.get(k, 0.0) + v.float()
        engine.train()
        n = self.recipe.eval.batches
        val_loss, _, means = self._agree(total / n, {k: v / n for k, v in stat_totals.items()})
        self.last_val_loss = val_loss
        self.metrics.eval({"step": self.state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                           **{f"val_{k}": _json_float(v) for k, v in means.items()}})
        return val_loss


class _HostCopy:
    """A device tensor's values on the host, copied behind the work queued so far: get() waits for that work only
    (on GPU: a page-locked buffer and an event; on CPU the values are ready)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.values = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.values.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = t

    def get(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()


def _json_float(x: float) -> Optional[float]:
    """JSON has no NaN/inf: non-finite values are written as null."""
    return x if math.isfinite(x) else None
