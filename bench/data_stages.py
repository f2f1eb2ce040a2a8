"""What an anneal stage (data.stages) does to the loss of the source it up-weights.

Two real sources: `code`, the Python standard library's sources (the demo's corpus), and `docs`, the prose of the
Python documentation's topics shipped in the standard library (pydoc_data.topics, one file per topic). The demo's
model (recipes/tiny-char.yaml) trains on 2 ranks, fp32, with train.schedule wsd:

- constant: one stage, code 0.8 / docs 0.2, the LR decaying over the last --anneal steps (decay_fraction);
- anneal: the same run's checkpoint at the end of its stable phase, extended with an anneal stage of --anneal steps
  at code 0.3 / docs 0.7 whose LR decays over it (the documented path: the stages already run unchanged, a stage
  added, --resume the checkpoint). Its first steps are the constant run's, so it is the staged run planned from the
  start.

Both are scored on each source's own val split (eval.per_source) at the end of the stable phase and at the end.

    python bench/data_stages.py --steps 500 --anneal 100
    python bench/data_stages.py --quick     # 12 steps of a 2-layer model, 1 rank, 300 KB corpus (the test runs this)

Writes bench/results/cpu-<date>-data-stages.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402

from llmforge.train.distributed import free_port  # noqa: E402


def write_docs(out: str) -> int:
    """pydoc_data.topics: one text file per documentation topic; returns the bytes written."""
    from pydoc_data.topics import topics

    os.makedirs(out, exist_ok=True)
    total = 0
    for name, text in topics.items():
        with open(os.path.join(out, f"{name}.txt"), "w", encoding="utf-8") as f:
            total += f.write(text)
    return total


def train(recipe: str, name: str, ranks: int, *extra: str) -> list[dict]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/pretrain.py"]
    cmd += ["--recipe", recipe, "--set", f"run.name={name}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(recipe, encoding="utf-8") as f:
        out = yaml.safe_load(f)["run"]["output_dir"]
    with open(os.path.join(out, name, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def measure(steps: int, anneal: int, anneal_docs: float, quick: bool) -> list[str]:
    from llmforge.config import load_recipe
    from llmforge.data.prepare import prepare, train_tokenizer
    from llmforge.demo.stdlib_corpus import build_stdlib_corpus

    started = time.time()
    stable = steps - anneal
    corpus = os.path.join(ROOT, "data", "stdlib-corpus")
    if not quick and not os.path.isdir(corpus):
        raise SystemExit(f"{corpus} is missing: run `make demo` (or its corpus step) first")
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            corpus = os.path.join(tmp, "corpus")
            build_stdlib_corpus(corpus, max_bytes=300_000, max_file_bytes=20_000)
        docs_bytes = write_docs(os.path.join(tmp, "docs"))
        with open(os.path.join(ROOT, "recipes", "tiny-char.yaml"), encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        prepared = os.path.join(tmp, "prepared")
        raw["run"]["output_dir"] = os.path.join(tmp, "runs")
        raw["data"]["sources"] = [
            {"name": "code", "type": "text", "paths": [os.path.join(corpus, "*.txt")]},
            {"name": "docs", "type": "text", "paths": [os.path.join(tmp, "docs", "*.txt")]},
        ]
        raw["data"]["prepared_dir"] = prepared
        raw["data"]["val_fraction"] = 0.05
        raw["data"]["stages"] = [{"name": "stable", "weights": {"code": 0.8, "docs": 0.2}}]
        raw["tokenizer"]["path"] = os.path.join(prepared, "tokenizer.json")
        raw["deepspeed"]["config"] = os.path.join(ROOT, "ds_configs", "zero2.json")
        raw["train"].update(
            max_steps=steps,
            schedule="wsd",
            decay_fraction=anneal / steps,
            precision="fp32",
            warmup_steps=min(50, stable),
        )
        raw["checkpoint"] = {"interval": stable, "keep_last": 2}
        raw["eval"] = {"interval": anneal, "batches": 20, "per_source": True}
        raw["logging"] = {"interval": math.gcd(50, anneal, stable), "tensorboard": False}
        if quick:
            raw["model"].update(d_model=32, n_layers=2)
            raw["train"]["micro_batch_size"] = 2
            raw["eval"]["batches"] = 2
        recipe = os.path.join(tmp, "constant.yaml")
        with open(recipe, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f)
        loaded = load_recipe(recipe)
        train_tokenizer(loaded, recipe, progress=False)
        manifest = prepare(loaded, recipe, progress=False)
        ranks = 1 if quick else 2
        constant = train(recipe, "constant", ranks)

        weights = {"code": round(1 - anneal_docs, 6), "docs": anneal_docs}
        raw["data"]["stages"] = [
            {"name": "stable", "steps": stable, "weights": {"code": 0.8, "docs": 0.2}},
            {"name": "anneal", "weights": weights, "lr_decay": True},
        ]
        extended = os.path.join(tmp, "anneal.yaml")
        with open(extended, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f)
        point = os.path.join(tmp, "runs", "constant", "checkpoints", f"step_{stable:08d}")
        annealed = train(extended, "anneal", ranks, "--resume", point)

    def at(rows: list[dict], step: int, key: str) -> float:
        return next(r[key] for r in rows if r.get("step") == step and key in r)

    sizes = {n: manifest[n]["splits"]["train"]["tokens"] for n in ("code", "docs")}
    lines = [
        f"recipes/tiny-char.yaml{' (quick: 2 layers of 32)' if quick else ''} (fp32, {ranks} rank(s), "
        f"{raw['train']['micro_batch_size']} x 256 tokens per rank per step), {steps} steps: {stable} stable "
        f"at code 0.8 / docs 0.2, then {anneal} with the LR decaying to min_lr, the mixture kept (constant) or "
        f"code {weights['code']:g} / docs {weights['docs']:g} (anneal). Sources: code = the stdlib corpus "
        f"({sizes['code']:,} train tokens), docs = pydoc_data.topics ({docs_bytes:,} bytes, {sizes['docs']:,} train "
        f"tokens). Val loss on each source's own val split, {raw['eval']['batches']} micro-batches per rank; "
        f"{time.time() - started:.0f} s in all.",
        "",
        "| run | step | val loss code | val loss docs | val loss (blend) | tokens read code / docs |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in (("constant", constant), ("anneal", annealed)):
        for step in [stable, steps] if name == "constant" else [steps]:
            tokens = next(r for r in rows if r.get("step") == step and "loss" in r)
            lines.append(
                f"| {name} | {step} | {at(rows, step, 'val_loss.code'):.4f} | {at(rows, step, 'val_loss.docs'):.4f} "
                f"| {at(rows, step, 'val_loss'):.4f} | {tokens['tokens.code']:,} / {tokens['tokens.docs']:,} |"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--anneal", type=int, default=100, help="steps of the anneal stage (the last)")
    p.add_argument("--anneal-docs", type=float, default=0.7, help="docs' weight in the anneal stage")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.steps, args.anneal = 12, 4
    os.chdir(ROOT)
    lines = [
        f"# An anneal stage's effect on the up-weighted source, {datetime.date.today()}",
        "",
        f"Command: `python bench/data_stages.py --steps {args.steps} --anneal {args.anneal}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
        *measure(args.steps, args.anneal, args.anneal_docs, args.quick),
    ]
    text = "\n".join(lines) + "\n"
    path = write_result(text, args.out, f"cpu-{datetime.date.today()}-data-stages.md")
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
