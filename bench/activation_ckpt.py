"""Peak memory and step time of llmforge's training step for each activation-checkpointing mode (none, full,
every_k with k=2, selective), the recipe's model and DeepSpeed config, one process, random tokens.

Peak memory is the peak over the timed steps above the memory before the first of them: on GPU the peak allocated
bytes; on CPU the peak RSS (reset through /proc/self/clear_refs, in a run with MALLOC_MMAP_THRESHOLD_=65536 so freed
activations leave RSS; step times come from a second run without it, since it costs page faults). Each mode runs in
its own processes so peaks do not mix (--quick, which checks the table, runs every row in one).

    python bench/activation_ckpt.py --recipe recipes/tiny-char.yaml
    python bench/activation_ckpt.py --recipe R --loss-chunk 1024   # + none and full with train.loss_chunk=1024
    python bench/activation_ckpt.py --recipe R --compile   # + none with train.compile (compiled blocks and loss)
    python bench/activation_ckpt.py --quick        # the test runs this
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

from results_file import write_result

MODES = [("none", 1), ("full", 1), ("every_k", 2), ("selective", 1)]


def run_rows(args: argparse.Namespace) -> None:
    """Measure each row of --rows (a JSON list of [mode, every, loss_chunk, compiled]) in this process, one JSON line
    each, then exit."""
    for mode, every, chunk, compiled in json.loads(args.rows):
        extra = [f"train.loss_chunk={chunk}"] * bool(chunk) + ["train.compile=true"] * compiled
        one_mode(args, mode, every, extra)
    os._exit(0)


def one_mode(args: argparse.Namespace, mode: str, every: int, extra: list[str]) -> None:
    import dataclasses

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from memory_probe import rss_bytes
    from train_throughput import RandomTokens, timed, vocab_size

    from llmforge.config import load_recipe
    from llmforge.config.deepspeed import compose_ds_config
    from llmforge.config.parallel import Layout
    from llmforge.model.gpt import GPT
    from llmforge.train.distributed import release_shm_segment, setup_env
    from llmforge.train.engine import build_engine
    from llmforge.train.guard import FaultInjector
    from llmforge.train.metrics import Metrics
    from llmforge.train.run import seed_everything
    from llmforge.train.task import resolve_model_config
    from llmforge.train.trainer import Objective, TaskData, Trainer, TrainerConfig

    recipe = load_recipe(
        args.recipe,
        args.overrides
        + extra
        + [f"model.activation_checkpointing.mode={mode}", f"model.activation_checkpointing.every={every}"],
    )
    recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, interval=0))
    setup_env()
    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    recipe = resolve_model_config(recipe, vocab_size(recipe, args.recipe), args.recipe)
    ds_config = compose_ds_config(recipe, 1, "/tmp/llmforge-bench", args.recipe, on_cpu)
    ds_config.pop("tensorboard", None)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    release_shm_segment()
    seed_everything(0)
    model = GPT(recipe.model)
    engine = build_engine(model, ds_config, Layout(1), recipe.train, recipe.model.activation_checkpointing).engine
    trainer = Trainer(
        engine,
        TrainerConfig.from_recipe(recipe, Layout(1), 0.0, None, FaultInjector()),
        TaskData(RandomTokens(recipe.model.vocab_size, recipe.data.seq_len), None),
        Objective.language_modeling(recipe.train),
        None,
        Metrics("/tmp", False),
    )
    sync = (lambda: None) if on_cpu else accel.synchronize
    trainer.train_step()  # warm-up: optimizer states exist before the peak is reset
    sync()
    if on_cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = rss_bytes()
    else:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = timed(trainer.train_step, 0, args.steps, sync)
    peak = (rss_bytes("VmHWM") if on_cpu else torch.cuda.max_memory_allocated()) - before
    tokens = recipe.train.micro_batch_size * recipe.train.grad_accum_steps * recipe.data.seq_len
    print(
        json.dumps(
            {
                "mode": mode,
                "every": every,
                "step_s": statistics.median(times),
                "tokens_per_s": tokens / statistics.median(times),
                "peak_bytes": peak,
                "device": "cpu" if on_cpu else accel.get_device_name(),
            }
        ),
        flush=True,
    )
    trainer.batches.close()
    engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny-char.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        help="also run none and full with train.loss_chunk set to this (the LM head over chunks of tokens)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run none (and none with --loss-chunk) with train.compile: compiled blocks and loss",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.overrides += [
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "data.seq_len=64",
            "train.micro_batch_size=4",
            "train.warmup_steps=1",
        ]
        args.steps = 2
    if args.rows:
        run_rows(args)
        return
    runs_to_do = [(mode, every, 0, False) for mode, every in MODES]
    if args.loss_chunk:
        runs_to_do += [("none", 1, args.loss_chunk, False), ("full", 1, args.loss_chunk, False)]
    if args.compile:
        runs_to_do += [("none", 1, 0, True)] + ([("none", 1, args.loss_chunk, True)] if args.loss_chunk else [])
    # each row in its own processes so peaks do not mix: memory with every large allocation mmapped (freed memory
    # leaves RSS), time without (that costs page faults); --quick (the test) checks the table, not the figures: one
    # process for every row
    batches = [runs_to_do] if args.quick else [[row] for row in runs_to_do]
    envs = [{**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}] + ([] if args.quick else [dict(os.environ)])
    rows = []
    for batch in batches:
        cmd = [sys.executable, os.path.abspath(__file__), "--recipe", args.recipe, "--steps", str(args.steps)]
        cmd += ["--rows", json.dumps(batch)] + [x for o in args.overrides for x in ("--set", o)]
        runs = []
        for env in envs:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"mode"')]
            if r.returncode != 0 or len(lines) != len(batch):
                sys.exit(f"{[row[0] for row in batch]}: failed\n{r.stderr[-2000:]}")
            runs.append(lines)
        for i, (_, _, chunk, compiled) in enumerate(batch):
            rows.append(
                {**runs[-1][i], "peak_bytes": runs[0][i]["peak_bytes"], "loss_chunk": chunk, "compiled": compiled}
            )
    from importlib.metadata import version

    device = rows[0]["device"]
    ref = rows[0]
    lines = [
        f"# Activation checkpointing, {device}, {datetime.date.today()}",
        "",
        f"Command: `python bench/activation_ckpt.py --recipe {args.recipe}"
        + "".join(f" --set {o}" for o in (args.overrides if not args.quick else []))
        + (f" --loss-chunk {args.loss_chunk}" if args.loss_chunk else "")
        + (" --compile" if args.compile else "")
        + (" --quick" if args.quick else "")
        + "`; "
        f"torch {version('torch')}, deepspeed {version('deepspeed')}. Median step time of {args.steps} steps; "
        "peak memory of those steps over the memory before them (activations and gradients; CPU: peak RSS).",
        "",
        "| mode | step s | tokens/s | peak MB | time vs none | memory vs none |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["mode"] if r["mode"] != "every_k" else f"every_k (k={r['every']})"
        name += f" + loss_chunk {r['loss_chunk']}" if r["loss_chunk"] else ""
        name += " + train.compile" if r["compiled"] else ""
        lines.append(
            f"| {name} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['step_s'] / ref['step_s']:.2f}x | {r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(text, args.out, f"{device.replace(' ', '-')}-{datetime.date.today()}-activation-ckpt.md")


if __name__ == "__main__":
    main()
