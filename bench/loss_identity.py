"""Per-step losses of the demo recipe for its first N steps, recorded or checked bit for bit against a record.

A refactor that claims "behaviour unchanged" runs this before (--record) and after (--check): the demo recipe
(recipes/tiny-char.yaml as `make demo` runs it, 2 CPU ranks) trains with logging every step, and the run is stopped
once N steps are logged (the schedule still spans the recipe's max_steps, so the losses are the demo's own).

    python bench/loss_identity.py --record bench/results/demo-losses.json   # needs `make demo`'s data/
    python bench/loss_identity.py --check bench/results/demo-losses.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from llmforge.errors import UserError
from llmforge.train.metrics import read_metrics

RECIPE = "recipes/tiny-char.yaml"
RUN = "loss-identity"


def demo_losses(steps: int, ranks: int) -> list[float]:
    run_dir = os.path.join("runs", RUN)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(ranks),
        "launch/pretrain.py",
        "--recipe",
        RECIPE,
        "--resume",
        "none",
        "--set",
        f"run.name={RUN}",
        "--set",
        "logging.interval=1",
        "--set",
        "train.precision=bf16",  # as recorded (the recipe's auto would pick fp32 on a CPU without native bf16)
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while proc.poll() is None:
            time.sleep(1)
            if len(_train_rows(run_dir)) >= steps:
                break
        else:
            if proc.returncode != 0:
                sys.exit(
                    f"training failed (exit {proc.returncode}): {proc.stderr.read()[-2000:] if proc.stderr else ''}"
                )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = _train_rows(run_dir)[:steps]
    if len(rows) < steps:
        sys.exit(f"only {len(rows)} steps were logged")
    return [r["loss"] for r in rows]


def _train_rows(run_dir: str) -> list[dict]:
    try:
        return [r for r in read_metrics(run_dir) if "loss" in r and "event" not in r]
    except (UserError, json.JSONDecodeError):  # not started yet, or a row half written
        return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="JSON", help="write the losses to this file")
    mode.add_argument("--check", metavar="JSON", help="compare the losses with this file, bit for bit")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    losses = demo_losses(args.steps, args.ranks)
    if args.record:
        with open(args.record, "w", encoding="utf-8") as f:
            json.dump(
                {"recipe": RECIPE, "ranks": args.ranks, "steps": args.steps, "losses": [float.hex(x) for x in losses]},
                f,
                indent=0,
            )
        print(f"recorded {len(losses)} losses to {args.record}: first {losses[0]!r}, last {losses[-1]!r}")
        return
    with open(args.check, encoding="utf-8") as f:
        ref = [float.fromhex(x) for x in json.load(f)["losses"]][: args.steps]
    diff = [i + 1 for i, (a, b) in enumerate(zip(losses, ref)) if float.hex(a) != float.hex(b)]
    if diff:
        first = diff[0] - 1
        sys.exit(
            f"{len(diff)} of {len(ref)} steps differ; first at step {diff[0]}: {losses[first]!r} "
            f"vs recorded {ref[first]!r}"
        )
    print(f"all {len(ref)} losses bit-identical to {args.check} (last {losses[-1]!r})")


if __name__ == "__main__":
    main()
