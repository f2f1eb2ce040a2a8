"""Perplexity of a checkpoint on the val split of each prepared dataset: every val window (seq_len + 1 tokens, each
token scored once), summed negative log-likelihood over scored tokens, exp of the mean."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch

from llmforge.config.data import DatasetSpec
from llmforge.data.loader import PretrainData
from llmforge.errors import DataError
from llmforge.tokenizer import fingerprint
from llmforge.train.checkpoint_files import find_checkpoint, read_state
from llmforge.train.loading import load_model


@torch.no_grad()
def dataset_perplexity(
    model: torch.nn.Module,
    directory: str,
    seq_len: int,
    tokenizer_fingerprint: str,
    max_samples: Optional[int] = None,
    batch_size: int = 8,
) -> dict:
    data = PretrainData([DatasetSpec(directory, 1.0)], seq_len, 0, "val", tokenizer_fingerprint)
    windows = data.windows[0] if data.windows else None
    n = 0 if windows is None else windows.num_samples
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise DataError(f"{directory}: the val split has no {seq_len + 1}-token window to score")
    nll, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        block = torch.from_numpy(np.stack([windows[i] for i in range(start, min(n, start + batch_size))]))
        logits, _ = model(block[:, :-1])
        losses = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), block[:, 1:].flatten(), reduction="sum"
        )
        nll += float(losses)
        tokens += block[:, 1:].numel()
    loss = nll / tokens
    return {"samples": n, "tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 50.0))}


def evaluate_checkpoint(
    checkpoint: str,
    datasets: Optional[list[str]] = None,
    max_samples: Optional[int] = None,
    out: Optional[str] = None,
    batch_size: int = 8,
) -> tuple[str, dict]:
    """Perplexity on each dataset's val split (default: the datasets the checkpoint was trained on); the results
    are written as JSON to `out` (default <run dir>/eval/perplexity_step_<N>.json). Returns (path, results)."""
    path = find_checkpoint(checkpoint, "--checkpoint")
    model, tok, recipe = load_model(path)
    dirs = datasets or [s.path for s in recipe.data.dataset_dirs()]
    if not dirs:
        raise DataError(f"{checkpoint}: the checkpoint's recipe names no datasets; pass --dataset DIR")
    started = time.time()
    results = {
        os.path.basename(os.path.normpath(d)): dataset_perplexity(
            model, d, recipe.data.seq_len, fingerprint(tok), max_samples, batch_size
        )
        for d in dirs
    }
    state = read_state(path)
    report = {
        "checkpoint": path,
        "step": state.get("step"),
        "seq_len": recipe.data.seq_len,
        "datasets": results,
        "seconds": round(time.time() - started, 2),
    }
    if out is None:
        out = os.path.join(recipe.run_dir, "eval", f"perplexity_step_{state.get('step', 0):08d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(out + ".tmp", out)
    return out, report
