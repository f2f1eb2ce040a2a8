"""Step time and peak memory per rank under each parallel layout, beside the planner's prediction.

`python bench/parallel_layouts.py [--seq-len 4096] [--layouts 1,dp2,tp2,sp2] [--experts 8 --layouts 1,dp2,ep2]
[--out FILE]` launches, for each layout,
`deepspeed --num_gpus N bench/parallel_layouts.py --worker ...`: a GPT (d_model 256, 4 layers, 8 heads, 4 key/value
heads, vocabulary 256: a sequence long enough that activations dominate) built and wrapped as `run_training` does
(train/engine.py: the sequence group, AutoTP and AutoEP through the layout's DeepSpeed sections), ZeRO-1, bf16, one
sequence per micro-batch, no activation checkpointing. Each rank reports the median of the timed steps and the peak
memory of its last step, over the memory that step started from and over the memory before the model was built
(CPU: peak RSS, reset before the step, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave RSS; GPU: peak
allocated). The prediction is the planner's: activations (`activation_bytes` on seq_len / sequence tokens and tensor
shards; CPU runs RMSNorm unfused) + 16-bit gradients for the step; + model states (`model_state_bytes` on the rank's
parameters, ZeRO over data x sequence) and buckets for the total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from memory_probe import rss_bytes  # bench/ is this script's directory: on sys.path

D_MODEL, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 4, 8, 4, 256


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from llmforge.config.parallel import Layout
    from llmforge.config.recipe import ModelConfig, MoEConfig, TrainConfig
    from llmforge.model import GPT
    from llmforge.model.parallel import SequenceSlice
    from llmforge.plan import activation_bytes, buffer_bytes, params_per_rank, rank_state_bytes
    from llmforge.train.distributed import release_shm_segment, setup_env
    from llmforge.train.engine import build_engine

    setup_env()
    accel = get_accelerator()
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    release_shm_segment()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    layout = Layout(world, args.tensor, args.sequence, rank, args.expert)
    moe = MoEConfig(num_experts=args.experts, top_k=2) if args.experts else MoEConfig()
    cfg = ModelConfig(
        vocab_size=VOCAB,
        max_seq_len=args.seq_len,
        d_model=D_MODEL,
        n_layers=LAYERS,
        n_heads=HEADS,
        n_kv_heads=KV_HEADS,
        moe=moe,
    )
    ds: dict = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "fused": True}},
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 1e6, "allgather_bucket_size": 1e6},
        "steps_per_print": 10**9,
    }
    on_gpu = accel.device_name() != "cpu"
    before = torch.cuda.memory_allocated() if on_gpu else rss_bytes()
    torch.manual_seed(0)
    model = GPT(cfg)
    engine = build_engine(model, ds, layout, TrainConfig()).engine
    piece = SequenceSlice(layout)
    g = torch.Generator().manual_seed(layout.data_rank)
    times = []
    for step in range(args.steps):
        tokens = torch.randint(0, VOCAB, (1, args.seq_len + 1), generator=g).to(engine.device)
        x, y, kwargs = piece(tokens[:, :-1], tokens[:, 1:])
        if step == args.steps - 1:  # the last step's peak over what it starts from: model states resident
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                resident = rss_bytes()
        started = time.perf_counter()
        _, loss = engine(x, y, **kwargs)
        engine.backward(loss * piece.scale)
        engine.step()
        if on_gpu:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if on_gpu else rss_bytes("VmHWM")
    n_rank = params_per_rank(cfg, layout.tensor, layout.expert)
    states = sum(rank_state_bytes(cfg, layout, 1).values()) + buffer_bytes(ds, n_rank)
    # what a step adds: activations kept for backward (+ transients) and the 16-bit gradients until the reduce
    step_adds = (
        activation_bytes(cfg, args.seq_len // layout.sequence, 1, "none", fused_norm=on_gpu, tensor=layout.tensor)
        + 2 * n_rank
    )
    results = [None] * world
    torch.distributed.all_gather_object(results, (statistics.median(times), peak - before, peak - resident))
    if rank == 0:
        print("RESULT " + json.dumps({"results": results, "states": states, "step": step_adds}), flush=True)
    torch.distributed.barrier()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1,dp2,tp2,sp2")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    p.add_argument("--quick", action="store_true", help="1 rank and sp2 at 512 tokens, 3 steps (the test suite)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tensor", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--sequence", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--expert", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument(
        "--experts", type=int, default=0, help="every block a mixture of this many experts, top 2 (layouts: epN too)"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.layouts, args.seq_len, args.steps, args.warmup = "1,sp2", 512, 3, 1

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from llmforge.parity import parse_layouts
    from llmforge.train.distributed import free_port

    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}
    moe = f", every block a mixture of {args.experts} experts (top 2)" if args.experts else ""
    lines = [
        f"Per rank, d_model {D_MODEL}, {LAYERS} layers{moe}, {HEADS} heads ({KV_HEADS} kv), vocabulary {VOCAB}, one "
        f"sequence of {args.seq_len} tokens per micro-batch, ZeRO-1, bf16, median of {args.steps - args.warmup} "
        "steps. Step peak: the last step's peak over the memory it started from (model states resident), i.e. "
        "activations and 16-bit gradients; total: the peak over the memory before the model was built (on CPU "
        "it also holds what the process takes besides tensors after that point, e.g. libraries and allocator "
        "pools). Planner: activations + 16-bit gradients (step), + model states and buckets (total).",
        "",
        "| layout | ranks | step s (rank 0) | step peak MB per rank | planner MB | error | total peak MB per rank "
        "| planner MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in parse_layouts(args.layouts):
        cmd = [launcher, "--num_gpus", str(spec.ranks), "--master_port", str(free_port()), __file__, "--worker"]
        cmd += [
            "--tensor",
            str(spec.layout.tensor),
            "--sequence",
            str(spec.layout.sequence),
            "--expert",
            str(spec.layout.expert),
            "--experts",
            str(args.experts),
            "--seq-len",
            str(args.seq_len),
        ]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            raise SystemExit(f"{spec.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        report = json.loads(found[-1][len("RESULT ") :])
        step_s = report["results"][0][0]
        totals = [r[1] / 2**20 for r in report["results"]]
        steps = [r[2] / 2**20 for r in report["results"]]
        step_pred = report["step"] / 2**20
        mean = statistics.mean(steps)
        lines.append(
            f"| {spec.name} | {spec.ranks} | {step_s:.3f} | {' / '.join(f'{x:.0f}' for x in steps)} | "
            f"{step_pred:.0f} | {(step_pred - mean) / mean:+.0%} | {' / '.join(f'{x:.0f}' for x in totals)} | "
            f"{step_pred + report['states'] / 2**20:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
