"""Metrics sinks: console line, metrics.jsonl rows (each with its wall-clock time) and TensorBoard, rank 0 only;
the run directory's log files (rank 0's console lines, each rank's warnings and errors)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
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


LOG_FILE = "train.log"  # rank 0's console lines
ERROR_LOG = "logs/rank{rank}.log"  # each rank's warnings and errors, created at the first one


def attach_log_files(run_dir: str, rank: int) -> None:
    """Copy this rank's log to the run directory: on rank 0 every llmforge line the console shows, on every rank
    its warnings and errors (a file opened at the first one). Errors a run ends with go there too (record_error)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.FileHandler(os.path.join(run_dir, LOG_FILE), encoding="utf-8"))
        handlers[-1].setLevel(logging.INFO)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    errors = logging.FileHandler(os.path.join(run_dir, ERROR_LOG.format(rank=rank)), encoding="utf-8", delay=True)
    errors.setLevel(logging.WARNING)
    handlers.append(errors)
    for h in handlers:
        h.setFormatter(fmt)
        logging.getLogger("llmforge").addHandler(h)
    record = logging.getLogger("llmforge.run_end")  # the files only: the console gets the error its own way
    record.propagate = False
    record.handlers = handlers


def record_error(error: BaseException) -> None:
    """Write the error a run ends with to the log files (a user error's one line; anything else with its
    traceback): what the console printed is not lost with the terminal."""
    record = logging.getLogger("llmforge.run_end")
    if isinstance(error, UserError):
        record.error(error.line())
    else:
        record.error("%s: %s", type(error).__name__, error, exc_info=error)


class Metrics:
    def __init__(self, run_dir: str, is_main: bool, tensorboard: bool = False):
        self.is_main = is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if is_main and tensorboard:  # llmforge's own writer: one series per quantity (DeepSpeed's monitor is off)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10)

    def _write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")

    def _tensorboard(self, prefix: str, row: dict) -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(f"{prefix}/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def train(self, row: dict) -> None:
        if not self.is_main:
            return
        self._tensorboard("train", row)
        self._write(row)
        mfu = f" mfu {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        log.info(
            "step %d | loss %s (mean %s) | lr %.3e | grad_norm %s | %.0f tok/s%s | mem %.2f GB | eta %s",
            row["step"],
            _fmt(row["loss"], ".4f"),
            _fmt(row.get("loss_mean"), ".4f"),
            row["lr"],
            _fmt(row["grad_norm"], ".3f"),
            row["tokens_per_s"],
            mfu,
            row["mem_gb"],
            _fmt_eta(row.get("eta_s")),
        )

    def eval(self, row: dict) -> None:
        if not self.is_main:
            return
        self._tensorboard("eval", row)
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
