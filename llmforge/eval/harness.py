"""lm-evaluation-harness on llmforge checkpoints: an `lm_eval` model ("llmforge") scoring with llmforge's own model
and tokenizer, so any lm-eval task runs without exporting first (`pip install llmforge[eval]`).

    llmforge lm-eval --checkpoint runs/tiny-char --tasks hellaswag --include-path my_tasks/ --limit 100

The exported Hugging Face directory works too: `lm_eval --model hf --model_args pretrained=DIR`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from llmforge.errors import UserError
from llmforge.model.generate import generate
from llmforge.train.checkpoint_files import find_checkpoint, read_state
from llmforge.train.loading import load_model

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval is an optional extra; the adapter is only built when it is installed
    LM, register_model = object, None


class LLMForgeLM(LM):
    """lm-eval's three request types on an llmforge model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, checkpoint: str, batch_size: int = 8, max_length: Optional[int] = None, **_: Any):
        super().__init__()
        self.model, self.tok, self.recipe = load_model(checkpoint)
        self.checkpoint = checkpoint
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> LLMForgeLM:
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"}
        return cls(**{**args, **extra})

    # -- scoring -------------------------------------------------------------------------------------------------
    def _context_ids(self, text: str) -> list[int]:
        return self.tok.encode(text) if text else [self.tok.eos_id]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) for each (context, continuation),
        the context cut from the left to fit max_length."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            rows, spans = [], []
            for ctx, cont in chunk:
                ids = (ctx + cont)[-(self.max_length + 1) :]
                n = min(len(cont), len(ids) - 1)
                rows.append(ids[:-1])
                spans.append((len(ids) - 1 - n, n, cont[-n:] if n else []))
            width = max(len(r) for r in rows)
            batch = torch.tensor([r + [self.tok.pad_id] * (width - len(r)) for r in rows])
            logp = torch.log_softmax(self.model(batch)[0].float(), dim=-1)
            for b, (first, n, target) in enumerate(spans):
                sl = logp[b, first : first + n]
                t = torch.tensor(target, dtype=torch.long)
                total = float(sl.gather(1, t[:, None]).sum()) if n else 0.0
                greedy = bool((sl.argmax(-1) == t).all()) if n else True
                out.append((total, greedy))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([(self._context_ids(r.args[0]), self.tok.encode(r.args[1])) for r in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of max_length tokens, each scored with the preceding tokens
        as context (the first from the end-of-text token)."""
        results = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            pairs, pos = [], 0
            while pos < len(ids):
                cont = ids[pos : pos + self.max_length]
                ctx = ([self.tok.eos_id] + ids[:pos])[-(self.max_length + 1 - len(cont)) :]
                pairs.append((ctx, cont))
                pos += len(cont)
            results.append(sum(score for score, _ in self._score(pairs)))
        return results

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self._context_ids(context)[-(self.max_length - 1) :]
            max_new = min(max_new, self.max_length - len(ids))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            new = generate(self.model, torch.tensor([ids]), max_new, temperature=temperature)[0, len(ids) :].tolist()
            if self.tok.eos_id in new:
                new = new[: new.index(self.tok.eos_id)]
            text = self.tok.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


if register_model is not None:
    register_model("llmforge")(LLMForgeLM)


def run_lm_eval(
    checkpoint: str,
    tasks: list[str],
    include_path: Optional[str] = None,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
    out: Optional[str] = None,
) -> tuple[str, dict]:
    """Run lm-eval tasks on a checkpoint; results JSON to `out` (default <run dir>/eval/lm_eval_step_<N>.json)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'llmforge[eval]' (or pip install lm-eval)") from None
    path = find_checkpoint(checkpoint, "--checkpoint")
    model = LLMForgeLM(checkpoint, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
    )
    step = read_state(path).get("step", 0)
    report = {
        "checkpoint": path,
        "step": step,
        "tasks": tasks,
        "results": results["results"],
        "versions": {k: str(v) for k, v in results.get("versions", {}).items()},
        "n_samples": results.get("n-samples", {}),
    }
    if out is None:
        out = os.path.join(model.recipe.run_dir, "eval", f"lm_eval_step_{step:08d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(out + ".tmp", out)
    return out, report
