"""Muon against AdamW at equal tokens: the same recipe, data, seed and steps, trained with `train.optimizer: adamw`
and `train.optimizer: muon` (each launched as users launch it: `deepspeed --num_gpus R launch/pretrain.py`), compared
on the validation loss every eval interval and the mean training loss of the last tenth of the steps.

Muon under ZeRO-1/2 needs `train.grad_clip: 0` (DeepSpeed clips its orthogonalized update instead of the gradient,
#8439: llmforge refuses the combination), so AdamW runs twice, with the recipe's clipping and without, to keep the
clipping out of the comparison. The recipe's data must be prepared (`make demo` does it for tiny-char).

    python bench/optimizers.py --recipe recipes/tiny-char.yaml --steps 600 --muon-lr 0.02 0.04
    python bench/optimizers.py --quick      # 8 steps of AdamW (clipped) and Muon, one run each (the test runs this)

Writes bench/results/cpu-<date>-optimizers.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402

from llmforge.train.distributed import free_port  # noqa: E402
from llmforge.train.metrics import read_metrics  # noqa: E402


def train(recipe: str, sets: list[str], name: str, out: str, ranks: int) -> list[dict]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/pretrain.py"]
    cmd += ["--recipe", recipe, "--resume", "none"]
    for s in [*sets, f"run.output_dir={out}", f"run.name={name}", "checkpoint.interval=0", "logging.interval=1"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return read_metrics(os.path.join(out, name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/tiny-char.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--muon-lr", type=float, nargs="+", default=[0.02])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    steps = 8 if args.quick else args.steps
    base = [*args.overrides, f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 12)}"]
    base += [f"eval.interval={max(1, steps // (2 if args.quick else 6))}"]
    runs = [("adamw", ["train.optimizer=adamw"])]
    if not args.quick:  # the quick mode (the test) checks that both optimizers run: one AdamW run is enough
        runs.append(("adamw, grad_clip 0", ["train.optimizer=adamw", "train.grad_clip=0"]))
    runs += [
        (f"muon lr {lr:g}, grad_clip 0", ["train.optimizer=muon", f"train.muon.lr={lr}", "train.grad_clip=0"])
        for lr in args.muon_lr
    ]
    with tempfile.TemporaryDirectory() as out:
        results = {
            label: train(args.recipe, [*base, *sets], f"r{i}", out, args.ranks) for i, (label, sets) in enumerate(runs)
        }
    evals = sorted({r["step"] for rows in results.values() for r in rows if "val_loss" in r})
    tail = max(1, steps // 10)
    lines = [
        f"# Muon vs AdamW at equal tokens, {datetime.date.today()}",
        "",
        f"Command: `python bench/optimizers.py --recipe {args.recipe} --steps {steps} --muon-lr "
        f"{' '.join(f'{x:g}' for x in args.muon_lr)}"
        + "".join(f" --set {o}" for o in args.overrides)
        + f"` ({args.ranks} ranks, `deepspeed --num_gpus {args.ranks} launch/pretrain.py` per run).",
        "",
        "| run | " + " | ".join(f"val loss @{s}" for s in evals) + f" | mean train loss, last {tail} steps |",
        "|---|" + "---|" * (len(evals) + 1),
    ]
    for label, rows in results.items():
        val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
        train_losses = [r["loss"] for r in rows if "loss" in r and "event" not in r and r["loss"] is not None]
        cells = " | ".join(f"{val[s]:.4f}" if s in val else "-" for s in evals)
        lines.append(f"| {label} | {cells} | {statistics.mean(train_losses[-tail:]):.4f} |")
    text = "\n".join(lines) + "\n"
    path = write_result(text, args.out, f"cpu-{datetime.date.today()}-optimizers.md")
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
