"""Metrics sinks: console line, metrics.jsonl rows and TensorBoard (through DeepSpeed's monitor), rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Optional

import psutil
import torch

from llmforge.errors import UserError

log = logging.getLogger("llmforge")


def memory_gb() -> float:
    """Peak accelerator memory on GPU, process resident memory on CPU (GB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    return psutil.Process().memory_info().rss / 1e9


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Metrics:
    def __init__(self, run_dir: str, is_main: bool, monitor: Any = None):
        self.is_main, self.monitor = is_main, monitor
        self.path = os.path.join(run_dir, "metrics.jsonl")

    def _write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _tensorboard(self, prefix: str, row: dict) -> None:
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            events = [
                (f"{prefix}/{k}", float(v), row["step"])
                for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and v is not None
            ]
            self.monitor.write_events(events)

    def train(self, row: dict) -> None:
        self._tensorboard("train", row)
        if not self.is_main:
            return
        self._write(row)
        mfu = f" mfu {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        log.info(
            "step %d | loss %s | lr %.3e | grad_norm %s | %.0f tok/s%s | mem %.2f GB | eta %s",
            row["step"],
            _fmt(row["loss"], ".4f"),
            row["lr"],
            _fmt(row["grad_norm"], ".3f"),
            row["tokens_per_s"],
            mfu,
            row["mem_gb"],
            _fmt_eta(row.get("eta_s")),
        )

    def eval(self, row: dict) -> None:
        self._tensorboard("eval", row)
        if not self.is_main:
            return
        self._write(row)
        log.info("eval step %d | val_loss %.4f | val_ppl %.2f", row["step"], row["val_loss"], row["val_ppl"])

    def event(self, name: str, **fields: Any) -> None:
        if not self.is_main:
            return
        row = {"event": name, **fields}
        self._write(row)
        log.info("%s %s", name, " ".join(f"{k}={v}" for k, v in fields.items()))


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no metrics (has this run started?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(run_dir: str) -> dict:
    """First/last val loss, steps and median tokens/s of a run's metrics.jsonl."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r and "event" not in r]
    rates = sorted(r["tokens_per_s"] for r in train[1:] or train)
    return {
        "steps": train[-1]["step"] if train else 0,
        "first_val_loss": evals[0]["val_loss"] if evals else None,
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "last_train_loss": train[-1]["loss"] if train else None,
        "median_tokens_per_s": rates[len(rates) // 2] if rates else None,
    }
