"""What a run reads at each optimizer step: the global batch (train.batch_warmup) and the data stage (data.stages).

Both are pure functions of the samples consumed so far, computed here without state: `BatchRamp.batch_at(c)` is the
global batch of the step that starts at sample c, and a `StagePlan` maps global sample indices to stages (fixed at
step boundaries, from the stages' lengths in steps or tokens). Resuming at any step, on any data-parallel size, gives
the same batches, stages and samples.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

from llmforge.config.data import StageSpec
from llmforge.config.recipe import TrainConfig


class BatchRamp:
    """The global batch by samples consumed, Megatron's --rampup-batch-size rule: from `start` sequences, `increment`
    more after each equal span of the first `ramp_samples` samples, `final` after them. Steps run at one batch are
    kept as segments (first step, samples before it, batch), so a step's start sample and back are O(log segments)."""

    def __init__(self, final: int, start: int = 0, increment: Optional[int] = None, ramp_samples: int = 0):
        self.final = final
        self.start = start if start and ramp_samples else final
        self.increment = increment or self.start
        self.ramp_samples = ramp_samples if self.start < final else 0
        self.levels = (final - self.start) // self.increment if self.ramp_samples else 0
        self.segments: list[tuple[int, int, int]] = []  # (first step, samples consumed before it, batch)
        step = consumed = 0
        for level in range(self.levels):
            end = -(-(level + 1) * self.ramp_samples // self.levels)  # first sample of the next level
            if consumed >= end:
                continue
            batch = self.start + level * self.increment
            self.segments.append((step, consumed, batch))
            steps = -(-(end - consumed) // batch)
            step, consumed = step + steps, consumed + steps * batch
        self.segments.append((step, consumed, final))
        self._steps = [s[0] for s in self.segments]
        self._samples = [s[1] for s in self.segments]

    @property
    def ramps(self) -> bool:
        return self.levels > 0

    def values(self) -> list[int]:
        """Every global batch the run takes, smallest first."""
        return [self.start + i * self.increment for i in range(self.levels)] + [self.final]

    def batch_at(self, consumed: int) -> int:
        """The global batch of the step that starts after `consumed` samples."""
        if consumed >= self.ramp_samples:
            return self.final
        return self.start + self.increment * (consumed * self.levels // self.ramp_samples)

    def consumed_at(self, step: int) -> int:
        """Samples consumed by the first `step` steps."""
        i = bisect.bisect_right(self._steps, step) - 1
        first, before, batch = self.segments[i]
        return before + (step - first) * batch

    def step_reaching(self, samples: int) -> int:
        """The first step boundary at which at least `samples` samples are consumed."""
        i = bisect.bisect_right(self._samples, samples) - 1
        first, before, batch = self.segments[i]
        return first + -(-(samples - before) // batch)


@dataclass
class Stage:
    name: str
    index: int
    first_step: int  # steps completed before its first step
    end_step: int
    first_sample: int
    end_sample: int
    weights: list[float]  # per dataset (PretrainData's order); 0 = not read in this stage
    lr_decay: bool


class StagePlan:
    """The stages of a run resolved to steps and global sample ranges."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self._firsts = [s.first_sample for s in stages]

    @classmethod
    def build(
        cls,
        specs: list[StageSpec],
        names: list[str],
        weights: list[float],
        seq_len: int,
        max_steps: int,
        ramp: BatchRamp,
    ) -> StagePlan:
        """`names`/`weights`: the datasets read, in order, and their own weights. Raises ValueError (one line) for
        a plan that cannot run: a stage of no step, stages past max_steps, a last stage that ends elsewhere."""
        if not specs:
            specs = [StageSpec(name="stage1")]
        stages: list[Stage] = []
        step = 0
        for i, spec in enumerate(specs):
            last, name = i == len(specs) - 1, spec.name or f"stage{i + 1}"
            if spec.steps is not None:
                end = step + spec.steps
            elif spec.tokens is not None:
                end = max(step + 1, ramp.step_reaching(ramp.consumed_at(step) + -(-spec.tokens // seq_len)))
            else:
                end = max_steps
            if end > max_steps or (last and end != max_steps) or end <= step:
                ends = f"ends at step {end}" if end > step else "has no step left"
                raise ValueError(
                    f"stage {i + 1} ({name}) {ends}; train.max_steps is {max_steps}"
                    + (f": set train.max_steps: {end}" if last and end > step else "")
                )
            if spec.weights:
                w = [float(spec.weights.get(n, 0.0)) for n in names]
                missing = [k for k, v in spec.weights.items() if v > 0 and k not in names]
                if missing:
                    raise ValueError(f"stage {i + 1} ({name}) weights {', '.join(missing)}, which has no sample")
            else:
                w = [float(x) for x in weights]
            stages.append(
                Stage(
                    name,
                    i,
                    step,
                    end,
                    ramp.consumed_at(step),
                    ramp.consumed_at(end),
                    w,
                    spec.lr_decay,
                )
            )
            step = end
        return cls(stages)

    def at_sample(self, g: int) -> Stage:
        """The stage global sample `g` belongs to (the last one past its end)."""
        return self.stages[max(0, bisect.bisect_right(self._firsts, g) - 1)]

    def decay_window(self) -> Optional[tuple[int, int]]:
        """(first step, steps) of the stage the learning rate decays over, or None."""
        last = self.stages[-1]
        return (last.first_step, last.end_step - last.first_step) if last.lr_decay else None

    def describe(self, names: list[str], fingerprints: list[str], seed: int, before: Optional[int] = None) -> list:
        """What decides the order of the samples before `before` (all when None): each stage started before it, its
        first sample and normalised weights by dataset (index, name, content fingerprint). A resume compares these:
        equal descriptions read the same samples."""
        out = []
        for s in self.stages:
            if before is not None and s.first_sample >= before:
                break
            total = sum(s.weights)
            out.append(
                {
                    "first_sample": s.first_sample,
                    "seed": seed,
                    "datasets": [
                        [d, names[d], round(w / total, 12), fingerprints[d]] for d, w in enumerate(s.weights) if w > 0
                    ],
                }
            )
        return out


def batch_ramp(t: TrainConfig, seq_len: int, replicas: int) -> BatchRamp:
    """The recipe's global batch by samples consumed (train.batch_warmup; train.grad_accum_steps resolved)."""
    w = t.batch_warmup
    return BatchRamp(t.global_batch(replicas), w.start, w.increment, -(-w.tokens // seq_len))


def check_batch_ramp(t: TrainConfig, seq_len: int, replicas: int) -> Optional[str]:
    """Why train.batch_warmup cannot run on `replicas` data-parallel replicas (one line), or None."""
    w, final = t.batch_warmup, t.global_batch(replicas)
    if not w.start:
        return None
    if w.start >= final:
        return f"start={w.start} is not below the global batch of {final} sequences"
    inc = w.increment or w.start
    if (final - w.start) % inc:
        return f"the global batch {final} is not start={w.start} plus a whole number of increment={inc}"
    if w.tokens < (final - w.start) // inc * seq_len:
        return f"tokens={w.tokens} is fewer than one sequence of data.seq_len={seq_len} per increase"
    unit = t.micro_batch_size * replicas
    bad = [b for b in batch_ramp(t, seq_len, replicas).values() if b % unit]
    if bad:
        return (
            f"a batch of {bad[0]} sequences is not a whole number of micro-batches of train.micro_batch_size="
            f"{t.micro_batch_size} x {replicas} data-parallel replicas: make start and increment multiples of {unit}"
        )
    return None
