"""Learning-rate schedules, computed by the project from the step number (no scheduler state to save)."""

from __future__ import annotations

import math
from typing import Optional

from llmforge.config.recipe import TrainConfig


def lr_at(step: int, cfg: TrainConfig, decay: Optional[tuple[int, int]] = None) -> float:
    """LR for 0-based optimizer step `step`: linear warmup to cfg.lr, then cosine | wsd | constant down to min_lr.
    `decay` (first step, steps): wsd's decay window, a data stage's (StagePlan.decay_window), instead of the last
    decay_fraction of max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd: warmup, stable at lr, then linear decay to min_lr over the last decay_fraction of training
    if decay is not None:
        decay_start, decay_steps = decay
    else:
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = cfg.max_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress
