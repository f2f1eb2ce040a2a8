"""Mixture of experts against the dense model with the same active parameters: recipes/moe-tiny.yaml (8 experts of
width 192 per block, top 2) and recipes/tiny-char.yaml (one SwiGLU of width 384), the same data, seed and steps.

Speed (in process, one rank): a training step (forward + backward) of one micro-batch for the dense model, the MoE
model with its experts in one grouped GEMM (`model.moe.impl: grouped`) and with one matmul per expert (`loop`),
beside the training FLOPs per token the planner counts for each (active parameters).

Quality (`--quality`): both recipes trained for --steps on 2 ranks, launched as users launch them (`deepspeed
--num_gpus 2 launch/pretrain.py`): validation loss at every eval interval, and the MoE run's expert load at the end.
The data must be prepared (`make demo`, or its corpus/tokenizer/prepare steps).

    python bench/moe.py                        # speed, 20 timed steps per row
    python bench/moe.py --quality --steps 2000 # quality, two 2-rank runs
    python bench/moe.py --quick                # 3 timed steps per row (the test runs this)

Writes bench/results/cpu-<date>-moe.md (or --out).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402

from llmforge.config import load_recipe  # noqa: E402
from llmforge.model.flops import flops_per_token, inactive_params  # noqa: E402
from llmforge.model.gpt import GPT, MoE  # noqa: E402
from llmforge.train.distributed import free_port  # noqa: E402
from llmforge.train.metrics import read_metrics  # noqa: E402

DENSE, SPARSE = "recipes/tiny-char.yaml", "recipes/moe-tiny.yaml"


def step_seconds(model: GPT, batch: int, seq: int, dtype: torch.dtype, steps: int) -> float:
    """Median seconds of a forward + backward over one (batch, seq) micro-batch, after 2 warm-up steps."""
    model = model.to(dtype).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size or 256, (batch, seq + 1), generator=g)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        router: list = []
        _, loss = model(x[:, :-1], x[:, 1:], router=router)
        if router:
            loss = loss + torch.stack([r.loss for r in router]).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def speed(steps: int) -> list[str]:
    dense_recipe, moe_recipe = load_recipe(DENSE), load_recipe(SPARSE)
    seq, batch = dense_recipe.data.seq_len, dense_recipe.train.micro_batch_size
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        cfgs = [("dense (tiny-char)", dense_recipe.model), ("moe-tiny, grouped GEMM", moe_recipe.model)]
        models = []
        for label, cfg in cfgs:
            cfg = copy.deepcopy(cfg)
            cfg.vocab_size, cfg.max_seq_len = 256, seq
            models.append((label, GPT(cfg)))
        looped = copy.deepcopy(models[1][1])
        for module in looped.modules():
            if isinstance(module, MoE):
                module.experts.impl = "loop"
        models.append(("moe-tiny, loop over experts", looped))
        base = None
        for label, model in models:
            s = step_seconds(model, batch, seq, dtype, steps)
            base = base or s
            n_total = model.num_params(non_embedding=True)
            active = n_total - inactive_params(model.cfg)
            fpt = flops_per_token(active, model.cfg, seq)
            rows.append(
                f"| {label} | {str(dtype).split('.')[-1]} | {n_total / 1e6:.2f}M | {active / 1e6:.2f}M | "
                f"{fpt / 1e6:.1f} | {s * 1e3:.0f} | {batch * seq / s:,.0f} | {s / base:.2f} |"
            )
    return [
        f"Speed: one rank, forward + backward of a {batch} x {seq} micro-batch, median of {steps} steps after 2 "
        f"warm-up steps, {torch.get_num_threads()} threads.",
        "",
        "| model | dtype | non-embedding params | active params | planner MFLOPs/token | ms/step | tokens/s | "
        "time / dense |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def train(recipe: str, steps: int, name: str, out: str) -> list[dict]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
    cmd += ["--recipe", recipe, "--resume", "none"]
    sets = [f"train.max_steps={steps}", f"eval.interval={max(1, steps // 10)}", f"run.output_dir={out}"]
    sets += [f"run.name={name}", "checkpoint.interval=0"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return read_metrics(os.path.join(out, name))


def quality(steps: int) -> list[str]:
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        runs = {"dense (tiny-char)": train(DENSE, steps, "dense", out), "moe-tiny": train(SPARSE, steps, "moe", out)}
    evals = sorted({r["step"] for rows in runs.values() for r in rows if "val_loss" in r})
    lines = [
        f"Quality: {steps} steps each, 2 ranks, the demo's data (stdlib corpus), {time.time() - started:.0f} s for "
        "both runs.",
        "",
        "| step | " + " | ".join(f"{label} val loss" for label in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for s in evals:
        vals = [
            next((r["val_loss"] for r in rows if r.get("step") == s and "val_loss" in r), None)
            for rows in runs.values()
        ]
        lines.append(f"| {s} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    last = [r for r in runs["moe-tiny"] if "expert_load_max.0" in r and "event" not in r][-1]
    blocks = sorted({int(k.split(".")[1]) for k in last if k.startswith("expert_load_max.")})
    loads = ", ".join(
        f"block {b} {last[f'expert_load_max.{b}']:.2f}/{last[f'expert_load_min.{b}']:.2f}" for b in blocks
    )
    lines += [
        "",
        f"moe-tiny at step {last['step']}: busiest/idlest expert over the mean {loads}; balance loss "
        f"{last['balance_loss']:.3f} (2.0 = uniform for top 2), router z-loss {last['router_z_loss']:.3f}.",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per run (--quality)")
    p.add_argument("--quality", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.chdir(ROOT)
    lines = [
        f"# Mixture of experts vs dense at equal active parameters, {datetime.date.today()}",
        "",
        f"Command: `python bench/moe.py{' --quality --steps ' + str(args.steps) if args.quality else ''}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
    ]
    lines += quality(args.steps) if args.quality else speed(3 if args.quick else 20)
    text = "\n".join(lines) + "\n"
    name = f"cpu-{datetime.date.today()}-moe{'-quality' if args.quality else ''}.md"
    path = write_result(text, args.out, name)
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
