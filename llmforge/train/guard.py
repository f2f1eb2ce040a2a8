"""Loss-spike and NaN guard, preemption signals, and fault injection for tests.

Every rank sees the same all-reduced step loss, so every rank takes the same decision without further collectives.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import time
from typing import Any, Optional

import torch

from llmforge.config.recipe import SpikeGuardConfig


class SpikeGuard:
    """Judges each step's loss against the recent good ones and counts skipped steps for rollback."""

    def __init__(self, cfg: SpikeGuardConfig):
        self.cfg = cfg
        self.history: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self.bad_steps: collections.deque[int] = collections.deque()

    def limit(self) -> float:
        """The highest loss that passes now: mean + threshold_std · std of the recent good losses (inf while there
        are fewer than min_history of them)."""
        if len(self.history) < self.cfg.min_history:
            return math.inf
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return mean + self.cfg.threshold_std * max(std, 1e-3 * abs(mean), 1e-6)

    def judge(self, loss: float) -> Optional[str]:
        """None for a good loss, else why the step must be skipped ('non_finite' or 'spike')."""
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss):
            return "non_finite"
        return "spike" if loss > self.limit() else None

    def reject(self, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """judge() on the device, without waiting for the loss: a bool tensor, True where the step must be
        skipped (None when the guard is off)."""
        if not self.cfg.enabled:
            return None
        return ~torch.isfinite(loss) | (loss > self.limit())

    @staticmethod
    def reason(loss: float) -> str:
        """Why a rejected step was skipped."""
        return "spike" if math.isfinite(loss) else "non_finite"

    def record(self, step: int, loss: float, skipped: bool) -> bool:
        """Note the step's outcome; True when skipped steps within bad_window reached max_bad_steps (roll back)."""
        if not skipped:
            self.history.append(loss)
        else:
            self.bad_steps.append(step)
        while self.bad_steps and self.bad_steps[0] <= step - self.cfg.bad_window:
            self.bad_steps.popleft()
        return self.cfg.enabled and len(self.bad_steps) >= self.cfg.max_bad_steps

    def reset_bad(self) -> None:
        self.bad_steps.clear()

    def state_dict(self) -> dict:
        return {"history": list(self.history), "bad_steps": list(self.bad_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state.get("history", []))
        self.bad_steps = collections.deque(state.get("bad_steps", []))


class StopSignal:
    """SIGUSR1/SIGTERM (slurm's preemption warning and kill) → a flag the ranks agree on at the next step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, install: bool = True) -> None:
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        for sig in self.SIGNALS if install else ():
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.time()

    @property
    def requested(self) -> bool:
        return self.signum is not None


class FaultInjector:
    """Test hook: LLMFORGE_FAULTS="nan@5,inf@7,spike@9" corrupts the loss of those steps (1-based) on every rank;
    "die_in_save@8" / "enospc_in_save@8" make the last rank die or hit ENOSPC while saving that step;
    "unsummed_sequence" (every step) averages a sequence group's gradients instead of summing its slices' shares,
    the kind of missing reduction `llmforge parity` is there to catch; "dropped_micro" (every step with
    accumulation) loses the last micro-batch's gradients while its loss is still counted, the kind of accumulation
    bug DeepSpeed has shipped (its #7985); "lost_expert_grads" keeps one expert-data-parallel rank's expert
    gradients only (see lose_expert_gradients)."""

    ENV = "LLMFORGE_FAULTS"

    def __init__(self, spec: str = ""):
        self.faults: dict[int, str] = {}
        self.flags: set[str] = set()
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, at, step = item.partition("@")
            if at:
                self.faults[int(step)] = kind
            else:
                self.flags.add(kind)

    @classmethod
    def from_env(cls) -> FaultInjector:
        """The faults $LLMFORGE_FAULTS asks for (none when unset): read once per run."""
        return cls(os.environ.get(cls.ENV, ""))

    def save_fault(self, step: int) -> Optional[str]:
        kind = self.faults.get(step)
        if kind in ("die_in_save", "enospc_in_save"):
            del self.faults[step]
            return kind.split("_")[0]
        return None

    def lose_expert_gradients(self, model: Any) -> int:
        """ "lost_expert_grads": every expert-parallel parameter keeps one expert-data-parallel rank's gradient only
        (that rank's scaled by the group's size, the others' zeroed before DeepSpeed averages them), as when the
        reduction across the experts' data-parallel group is missing. Returns the number of parameters hooked."""
        if "lost_expert_grads" not in self.flags:
            return 0
        from deepspeed.moe.utils import is_moe_param
        from deepspeed.utils import groups

        hooked = 0
        for p in model.parameters():
            if is_moe_param(p):
                size = groups._get_expert_data_parallel_world_size(p.group_name)
                scale = float(size) if groups._get_expert_data_parallel_rank(p.group_name) == 0 else 0.0
                p.register_hook(lambda g, scale=scale: g * scale)
                hooked += 1
        return hooked

    def drops_gradients(self, micro: int, accum: int) -> bool:
        """Whether this micro-batch's gradients are to be lost ("dropped_micro": the last of each step)."""
        return "dropped_micro" in self.flags and accum > 1 and micro == accum - 1

    def loss(self, step: int, loss: torch.Tensor, sequence: int = 1) -> torch.Tensor:
        if "unsummed_sequence" in self.flags and sequence > 1:
            loss = loss / sequence
        kind = self.faults.get(step)
        if kind in ("nan", "inf", "spike"):
            del self.faults[step]  # once: a step redone after a rollback is clean
        if kind == "nan":
            return loss * float("nan")
        if kind == "inf":
            return loss * float("inf")
        if kind == "spike":
            return loss * 20.0
        return loss
