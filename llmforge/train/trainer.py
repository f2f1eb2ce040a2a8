"""The training loop: `Trainer.train()` runs `train_step()` and small side effects (log, eval, checkpoint, guard,
preemption)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from llmforge.config.parallel import Layout
from llmforge.config.recipe import EvalConfig, Recipe, SpikeGuardConfig, TrainConfig
from llmforge.data.loader import micro_batch_indices, next_micro_batch
from llmforge.data.prefetch import Prefetcher
from llmforge.data.stages import BatchRamp, batch_ramp
from llmforge.errors import CorruptSampleError
from llmforge.model.gpt import RouterOutput, document_ids
from llmforge.model.parallel import SequenceSlice
from llmforge.train.checkpoint import Checkpointer, TrainState
from llmforge.train.guard import FaultInjector, SpikeGuard, StopSignal
from llmforge.train.metrics import Metrics, memory_gb
from llmforge.train.schedule import lr_at


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    lr: float
    skipped: Optional[str]  # why the optimizer step was skipped, or None
    stop: bool  # a rank received a stop signal
    tokens: int  # non-pad input tokens of the step, all ranks
    # 2-norm of the step's gradient before clipping, a float or a device tensor (read on the host when logged, so a
    # step does not wait for the device); None where it was not computed
    grad_norm: Any = None
    stats: dict = field(default_factory=dict)  # the objective's own metrics (DPO rewards, ...), mean over ranks
    batch: int = 0  # the step's global batch (sequences)


LossFn = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class LMLoss:
    """Next-token cross-entropy on (inputs, targets, ...) batches (targets IGNORE_INDEX carry no loss), plus optional
    z-loss; loss_chunk > 0 computes the LM head and loss that many tokens at a time (see GPT.forward). Under
    sequence parallelism each rank runs its slice of the samples (model/parallel.py: SequenceSlice)."""

    def __init__(
        self,
        z_loss: float = 0.0,
        loss_chunk: int = 0,
        sequence: Optional[SequenceSlice] = None,
        with_aux: bool = True,
        documents_eos: Optional[int] = None,
    ):
        self.z_loss, self.loss_chunk, self.sequence, self.with_aux = z_loss, loss_chunk, sequence, with_aux
        self.documents_eos = documents_eos  # document-masked attention: the EOS id that ends each packed document

    def __call__(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch[0], batch[1]
        inputs = inputs.to(engine.device, non_blocking=True)
        targets = targets.to(engine.device, non_blocking=True)
        router: list[RouterOutput] = []
        kwargs: dict[str, Any] = {}
        if self.documents_eos is not None:  # of the whole sequences, before a sequence rank takes its slice
            documents = document_ids(inputs, self.documents_eos)
        if self.sequence is not None:
            inputs, targets, kwargs = self.sequence(inputs, targets)
        if self.documents_eos is not None:
            kwargs["documents"] = documents
        _, loss = engine(inputs, targets, loss_chunk=self.loss_chunk, z_loss=self.z_loss, router=router, **kwargs)
        if self.sequence is not None:
            loss = loss * self.sequence.scale
        if not router:
            return loss, {}
        stats = router_stats(router)
        if not self.with_aux:  # scoring: the language-modelling loss, with the routers' measurements beside it
            return loss, stats
        stats["lm_loss"] = loss.detach()
        return loss + stats["aux_loss"], stats


@dataclass
class Objective:
    """The loss a task trains on, and the one its val split is scored with."""

    train: LossFn
    eval: LossFn

    @classmethod
    def language_modeling(
        cls, t: TrainConfig, layout: Optional[Layout] = None, documents_eos: Optional[int] = None
    ) -> Objective:
        """`documents_eos`: the EOS id, for document-masked attention (model.attention_mask: document)."""
        sequence = SequenceSlice(layout) if layout is not None and layout.sequence > 1 else None
        return cls(
            LMLoss(t.z_loss, t.loss_chunk, sequence, documents_eos=documents_eos),
            LMLoss(0.0, t.loss_chunk, sequence, with_aux=False, documents_eos=documents_eos),
        )


def router_stats(router: list[RouterOutput]) -> dict[str, torch.Tensor]:
    """The MoE blocks' contribution to a micro-batch's objective and metrics: `aux_loss` (their weighted auxiliary
    losses, summed over blocks as Megatron adds them; it carries gradient), the unweighted `balance_loss` and
    `router_z_loss` averaged over blocks, `dropped` (the fraction of assignments over capacity), and per block L the
    busiest and idlest expert's assignments over the mean (`expert_load_max.L`, `expert_load_min.L`; 1 = balanced)."""
    stats = {
        "aux_loss": torch.stack([r.loss for r in router]).sum(),
        "balance_loss": torch.stack([r.balance for r in router]).mean(),
        "router_z_loss": torch.stack([r.z for r in router]).mean(),
        "dropped": torch.stack([r.dropped.float() / r.load.sum() for r in router]).mean(),
    }
    for r in router:
        load = r.load.float()
        stats[f"expert_load_max.{r.layer}"] = load.max() / load.mean()
        stats[f"expert_load_min.{r.layer}"] = load.min() / load.mean()
    return stats


@dataclass
class TrainerConfig:
    """What the loop needs from the recipe, and from the run it belongs to."""

    schedule: TrainConfig  # max_steps, batch sizes, the LR schedule
    layout: Layout  # this rank's place among data-parallel replicas, sequence and tensor groups
    spike_guard: SpikeGuardConfig
    eval: EvalConfig
    log_interval: int
    checkpoint_interval: int
    prefetch: int
    flops_per_token: float  # training FLOPs per token (6N + attention), for MFU
    peak_flops: Optional[float]  # per rank (GPU); None on CPU (no MFU)
    faults: FaultInjector = field(default_factory=FaultInjector)
    ramp: Optional[BatchRamp] = None  # the global batch by samples consumed (train.batch_warmup); None: constant

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        layout: Layout,
        flops_per_token: float,
        peak_flops: Optional[float],
        faults: FaultInjector,
    ) -> TrainerConfig:
        return cls(
            recipe.train,
            layout,
            recipe.train.spike_guard,
            recipe.eval,
            recipe.logging.interval,
            recipe.checkpoint.interval,
            recipe.data.prefetch,
            flops_per_token,
            peak_flops,
            faults,
            batch_ramp(recipe.train, recipe.data.seq_len, layout.data),
        )

    @property
    def global_batch(self) -> int:
        """The full global batch (after any batch warmup)."""
        return self.schedule.global_batch(self.layout.data)

    def batch_at(self, consumed: int) -> tuple[int, int]:
        """(global batch, micro-batches per rank) of the step that starts after `consumed` samples."""
        batch = self.ramp.batch_at(consumed) if self.ramp is not None else self.global_batch
        return batch, batch // (self.schedule.micro_batch_size * self.layout.data)


@dataclass
class TaskData:
    """A task's splits. Each has batch(indices), num_samples and tokens(batch) (its non-pad input tokens)."""

    train: Any
    val: Optional[Any]
    val_sources: dict[str, Any] = field(default_factory=dict)  # each dataset's own val split (eval.per_source)


class Trainer:
    def __init__(
        self,
        engine: Any,
        cfg: TrainerConfig,
        data: TaskData,
        objective: Objective,
        checkpointer: Optional[Checkpointer],
        metrics: Metrics,
    ):
        """`checkpointer` None: no checkpoints are saved and a divergence cannot roll back (benchmarks)."""
        self.engine, self.cfg, self.data, self.objective = engine, cfg, data, objective
        self.checkpointer, self.metrics = checkpointer, metrics
        self.layout = cfg.layout
        self.state = TrainState()
        self.stop = StopSignal(install=False)
        self.guard = SpikeGuard(cfg.spike_guard)
        self.last_val_loss: Optional[float] = None
        # ZeRO-0 in fp32 hands the gradients to the bare torch optimizer: DeepSpeed then neither reports their norm
        # nor skips a step whose gradients are not finite, so the trainer does both itself (own_grad_norm).
        self.plain_optimizer = engine.zero_optimization_stage() == 0 and not (
            engine.bfloat16_enabled() or engine.fp16_enabled()
        )
        self.drop_update = False
        if self.plain_optimizer:
            engine.optimizer.register_step_pre_hook(self._skip_non_finite_update)
        device = torch.device(engine.device)
        for split in (data.train, data.val, *data.val_sources.values()):
            if hasattr(split, "defer_errors"):
                split.defer_errors = True  # a corrupt sample is reported by every rank at the step's all-reduce
        self.batches = Prefetcher(
            self._read_micro, self._next_micro, cfg.prefetch, device if device.type == "cuda" else None
        )
        self.plan = getattr(data.train, "plan", None)  # data.stages, resolved (pre-training); None elsewhere
        self.decay = self.plan.decay_window() if self.plan is not None else None

    # -- the step -------------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum_steps micro-batches.

        Before the last backward, one all-reduce gives every rank the step's mean loss (and the objective's metrics),
        its token count and any stop signal. A step whose loss is non-finite or a spike is skipped through DeepSpeed's
        own overflow check: the last backward carries NaN, so the whole accumulated gradient is dropped and neither
        weights nor optimizer state change. That decision is taken on the device, so the host never waits for the GPU
        inside the step: the all-reduced values travel to the host behind the forward and are read once the
        optimizer step is queued (on GPU, the next micro-batch's input copy does not wait either: see data.prefetch).
        """
        t, engine = self.cfg.schedule, self.engine
        step = self.state.step + 1
        lr = lr_at(self.state.step, t, self.decay)
        batch_size, n = self.cfg.batch_at(self.state.consumed_samples)
        if n != engine.gradient_accumulation_steps():  # batch warmup: DeepSpeed scales each micro-batch's loss by 1/n
            engine.set_train_batch_size(t.micro_batch_size * n * engine.dp_world_size)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices: muon.lr x the schedule's shape
        total = torch.zeros((), device=engine.device)
        stat_totals: dict[str, torch.Tensor] = {}
        tokens = 0
        skipped_before = engine.skipped_steps
        for micro in range(n):
            # the step's last micro-batch reduces gradients and steps the optimizer: told, not counted, as the
            # number of micro-batches per step changes during a batch warmup
            engine.set_gradient_accumulation_boundary(micro == n - 1)
            batch = self.batches.get((self.state.consumed_samples, micro))
            if self.layout.counts_tokens:
                tokens += self.data.train.tokens(batch)
            loss, stats = self.objective.train(engine, batch)
            loss = self.cfg.faults.loss(step, loss, self.layout.sequence)
            total += loss.detach().float()
            for k, v in stats.items():
                stat_totals[k] = stat_totals.get(k, 0.0) + v.detach().float()
            if micro == n - 1:
                packed = self._reduce(total / n, tokens, {k: v / n for k, v in stat_totals.items()})
                rejected = self.guard.reject(packed[0])
                if rejected is not None:
                    loss = loss * torch.where(rejected, float("nan"), 1.0)
                    packed = torch.cat([packed, rejected.float().reshape(1)])
                values = _HostCopy(packed)
            if self.cfg.faults.drops_gradients(micro, n):
                loss = loss * 0.0  # test hook: this micro-batch's gradients are lost, its loss is still logged
            engine.backward(loss)
            own_norm = self.own_grad_norm() if micro == n - 1 and self.plain_optimizer else None
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        host = values.get()
        mean_loss, stop, step_tokens = host[0], host[1] > 0, int(host[2])
        self._raise_corrupt_samples(host[3], step)
        means = {k: host[4 + i] for i, k in enumerate(stat_totals)}
        skipped = self.guard.reason(mean_loss) if rejected is not None and host[-1] > 0 else None
        grad_norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
        if skipped is None and (
            engine.skipped_steps > skipped_before or (own_norm is not None and not math.isfinite(own_norm))
        ):
            skipped = "non_finite_grad"  # finite loss, but inf/NaN gradients: the update was not applied
        self.state.step = step
        self.state.consumed_samples += batch_size
        self.state.consumed_tokens += step_tokens
        if self.plan is not None:
            self.state.source_tokens = self.data.train.tokens_by_source(self.state.consumed_samples)
        return StepResult(mean_loss, lr, skipped, stop, step_tokens, grad_norm, means, batch_size)

    def own_grad_norm(self) -> float:
        """For the bare-optimizer path (ZeRO-0, fp32), after the last backward of a step (DeepSpeed has all-reduced
        the gradients then): the 2-norm of the gradient before clipping, through DeepSpeed's own function for it
        (get_weight_norm over the gradients, as its fp16/bf16 wrappers call it; tensor-parallel shards summed over
        their group). A non-finite norm makes the optimizer step that follows change nothing (see
        _skip_non_finite_update), as DeepSpeed's overflow check does on its other paths."""
        from deepspeed.runtime.utils import get_weight_norm

        engine = self.engine
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = float(get_weight_norm(grads, mpu=engine.mpu)) if grads else 0.0
        if norm < 0:  # get_weight_norm's answer for inf/NaN
            norm = math.inf
        self.drop_update = not math.isfinite(norm)
        return norm

    def _skip_non_finite_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """A pre-step hook on the bare torch optimizer: after DeepSpeed's clipping, drop every gradient of a step
        whose norm is not finite, so AdamW skips every parameter (weights, moments and step counts unchanged)."""
        if self.drop_update:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.drop_update = False

    def _next_micro(self, key: tuple[int, int]) -> tuple[int, int]:
        batch, accum = self.cfg.batch_at(key[0])
        return next_micro_batch(*key, accum, batch)

    def _read_micro(self, key: tuple[int, int]) -> Any:
        consumed, micro = key
        lay = self.layout
        return self.data.train.batch(
            micro_batch_indices(consumed, micro, lay.data_rank, lay.data, self.cfg.schedule.micro_batch_size)
        )

    def _reduce(self, loss: torch.Tensor, tokens: int, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return reduce_step_values(
            loss, self.stop.requested, tokens, stats, self.layout.world, self._problem() is not None
        )

    def _problem(self) -> Optional[str]:
        """A corrupt sample this rank has read (its split's `problem`), or None."""
        splits = (self.data.train, self.data.val, *self.data.val_sources.values())
        return next((p for split in splits if (p := getattr(split, "problem", None))), None)

    def _raise_corrupt_samples(self, ranks: float, step: int) -> None:
        """Every rank stops at the same step when any rank read a corrupt sample (told by the step's all-reduce):
        the ranks that read one name it, the others say which step they stopped at, one line each."""
        if ranks <= 0:
            return
        own = self._problem()
        raise CorruptSampleError(
            own
            if own
            else f"rank {self.layout.rank}: stopped at step {step}: {int(ranks)} rank(s) read a token id outside "
            f"the vocabulary (their lines name the shard)"
        )

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self, state: TrainState, stop: StopSignal) -> str:
        """Train from `state` to max_steps; returns 'finished' or 'preempted' (a checkpoint was saved first)."""
        self.state, self.stop = state, stop
        self.guard.load_state_dict(state.guard)
        try:
            return self._train()
        finally:
            self.batches.close()

    def _train(self) -> str:
        cfg = self.cfg
        max_steps = cfg.schedule.max_steps
        if self.state.step == 0 and cfg.eval.interval and cfg.eval.at_start:
            self.evaluate()
        window_start, window_steps, window_tokens, window_losses = time.time(), 0, 0, []
        run_start, run_start_step = time.time(), self.state.step
        while self.state.step < max_steps:
            self._stage_event()
            result = self.train_step()
            window_steps += 1
            window_tokens += result.tokens
            if math.isfinite(result.loss) and result.skipped is None:
                window_losses.append(result.loss)
            step = self.state.step
            last = step == max_steps
            if result.skipped:
                self.metrics.event("skipped_step", step=step, reason=result.skipped, loss=_json_float(result.loss))
            if self.guard.record(step, result.loss, result.skipped is not None) and self._rollback(step):
                continue
            self.state.guard = self.guard.state_dict()
            if step % cfg.log_interval == 0 or last:
                now = time.time()
                self.log(
                    step,
                    result,
                    window_tokens / max(now - window_start, 1e-9),
                    (now - run_start) / max(1, step - run_start_step),
                    sum(window_losses) / len(window_losses) if window_losses else None,
                )
                window_start, window_steps, window_tokens, window_losses = time.time(), 0, 0, []
            if cfg.eval.interval and (step % cfg.eval.interval == 0 or last):
                self.evaluate()
            if result.stop:
                return self._preempt()
            if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or last:
                self._save()
        return "finished"

    def _stage_event(self) -> None:
        """A `stage` event in metrics.jsonl when the next step is a data stage's first (data.stages)."""
        if self.plan is None:
            return
        consumed = self.state.consumed_samples
        stage = self.plan.at_sample(consumed)
        if stage.first_sample != consumed:
            return
        names = self.data.train.names
        self.metrics.event(
            "stage",
            step=self.state.step + 1,
            stage=stage.name,
            index=stage.index,
            first_sample=consumed,
            end_step=stage.end_step,
            weights={names[d]: w for d, w in enumerate(stage.weights) if w > 0},
            lr_decay=stage.lr_decay,
        )

    def _save(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(self.engine, self.state)

    def _rollback(self, step: int) -> bool:
        """Persistent divergence: reload the newest complete checkpoint, keep the data position (so the window that
        caused it is skipped), and go on. False when there is no checkpoint to go back to."""
        restored = self.checkpointer.rollback(self.engine) if self.checkpointer else None
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
        self._save()
        since = (time.time() - self.stop.received_at) if self.stop.received_at else None
        self.metrics.event(
            "preempted",
            step=self.state.step,
            signal=self.stop.signum,
            save_s=round(time.time() - started, 3),
            signal_to_saved_s=None if since is None else round(since, 3),
        )
        return "preempted"

    def log(
        self, step: int, result: StepResult, tokens_per_s: float, s_per_step: float, loss_mean: Optional[float] = None
    ) -> None:
        """One metrics row: `loss` is this step's, `loss_mean` the mean over the steps since the last row (as
        Megatron and GPT-NeoX log it; skipped steps left out). tokens/s and MFU count the non-pad input tokens of
        the steps actually run (SFT rows are padded to the longest row of their micro-batch; a DPO sample is two
        rows), so padding is not counted as work; MFU = flops_per_token x tokens/s / (peak FLOP/s x ranks), every
        rank of every group counted."""
        grad_norm = result.grad_norm
        mfu = None
        if self.cfg.peak_flops:
            mfu = self.cfg.flops_per_token * tokens_per_s / (self.cfg.peak_flops * self.layout.world)
        self.metrics.train(
            {
                "step": step,
                "tokens": self.state.consumed_tokens,
                "loss": _json_float(result.loss),
                "loss_mean": loss_mean,
                "lr": result.lr,
                "grad_norm": None if grad_norm is None else _json_float(float(grad_norm)),
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "mem_gb": memory_gb(),
                "eta_s": s_per_step * (self.cfg.schedule.max_steps - step),
                **{k: _json_float(v) for k, v in result.stats.items()},
                **({"batch": result.batch} if self.cfg.ramp is not None and self.cfg.ramp.ramps else {}),
                **{f"tokens.{name}": n for name, n in self.state.source_tokens.items()},
            }
        )

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean val loss (and objective metrics, prefixed val_) over eval.batches micro-batches per rank, always the
        same val samples; with eval.per_source, each dataset's own val split too (val_loss.<name>)."""
        val = self.data.val
        if val is None or val.num_samples == 0:
            return None
        self.engine.eval()
        val_loss, means = self._score(val)
        per_source = {f"val_loss.{name}": self._score(split)[0] for name, split in self.data.val_sources.items()}
        self.engine.train()
        self.last_val_loss = val_loss
        self.metrics.eval(
            {
                "step": self.state.step,
                "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 50.0)),
                **{f"val_{k}": _json_float(v) for k, v in means.items()},
                **per_source,
            }
        )
        return val_loss

    def _score(self, split: Any) -> tuple[float, dict[str, float]]:
        """Mean loss and objective metrics over all ranks of eval.batches micro-batches of `split`."""
        engine, mb, lay = self.engine, self.cfg.schedule.micro_batch_size, self.layout
        total = torch.zeros((), device=engine.device)
        stat_totals: dict[str, torch.Tensor] = {}
        n = self.cfg.eval.batches
        for b in range(n):
            rows = micro_batch_indices(0, b, lay.data_rank, lay.data, mb)
            loss, stats = self.objective.eval(engine, split.batch(rows))
            total += loss.float()
            for k, v in stats.items():
                stat_totals[k] = stat_totals.get(k, 0.0) + v.float()
        host = self._reduce(total / n, 0, {k: v / n for k, v in stat_totals.items()}).tolist()
        self._raise_corrupt_samples(host[3], self.state.step)
        return host[0], {k: host[4 + i] for i, k in enumerate(stat_totals)}


def reduce_step_values(
    loss: torch.Tensor, stop: bool, tokens: int, stats: dict[str, torch.Tensor], world: int, corrupt: bool = False
) -> torch.Tensor:
    """One all-reduce over all `world` ranks, queued without waiting for its result: [mean loss over ranks, number of
    ranks asked to stop, tokens of all ranks, number of ranks that read a corrupt sample, mean of each objective
    metric], on the loss's device. Ranks of one
    tensor or sequence group hold one replica's share each: their losses average to the replica's, and only one of
    them counts its tokens."""
    packed = torch.stack(
        [
            loss.detach().float(),
            torch.full((), 1.0 if stop else 0.0, device=loss.device),
            torch.full((), float(tokens), device=loss.device),
            torch.full((), 1.0 if corrupt else 0.0, device=loss.device),
            *[v.reshape(()).float().to(loss.device) for v in stats.values()],
        ]
    )
    if dist.is_initialized() and world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed[0] /= world
    packed[4:] /= world
    return packed


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
