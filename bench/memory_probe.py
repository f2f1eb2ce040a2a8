"""Measure what a training rank holds after one step, to check the planner's model-state formula.

Run under a launcher: `deepspeed --num_gpus 2 bench/memory_probe.py --stage 2 --d-model 512 --layers 8
[--precision fp32]`. The optimizer is the one llmforge trains with (config/deepspeed.py): torch's fused AdamW on CPU
(no DeepSpeed op to JIT-build), DeepSpeed's FusedAdam on GPU. Rank 0
prints one JSON line: parameters, ZeRO stage, world size, for every rank the peak memory of the second optimizer
step over the memory just after process-group start-up (CPU: peak RSS, reset before the step; run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave RSS; GPU: peak allocated), and the planner's prediction.
A micro-batch of
one 16-token sequence keeps activations negligible next to the model states.
"""

from __future__ import annotations

import argparse
import json
import os

CPU_ADAMW = {"torch_adam": True, "fused": True}  # what config/deepspeed.py gives a CPU run


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from llmforge.config.parallel import Layout
    from llmforge.config.recipe import ModelConfig, TrainConfig
    from llmforge.plan import model_state_bytes
    from llmforge.train.distributed import release_shm_segment, setup_env
    from llmforge.train.engine import build_engine, build_model

    setup_env()
    accel = get_accelerator()
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    release_shm_segment()
    world = torch.distributed.get_world_size()
    cfg = ModelConfig(
        vocab_size=args.vocab, max_seq_len=16, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=8
    )
    on_gpu = accel.device_name() != "cpu"
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": args.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-4, **({} if on_gpu else {"torch_adam": True, "fused": True})},
        },
        "zero_optimization": {
            "stage": args.stage,
            "reduce_bucket_size": 1e6,
            "allgather_bucket_size": 1e6,
            "stage3_prefetch_bucket_size": 1e6,
            "stage3_max_live_parameters": 1e6,
            "stage3_param_persistence_threshold": 1e4,
            "overlap_comm": False,
        },
    }
    before = torch.cuda.memory_allocated() if on_gpu else rss_bytes()
    model = build_model(cfg, ds)
    n = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters())
    engine = build_engine(model, ds, Layout(world, rank=torch.distributed.get_rank()), TrainConfig()).engine
    x = torch.randint(0, args.vocab, (1, 16), device=engine.device)
    for step in range(2):
        if step == 1:  # the peak of a steady-state step, without start-up transients (the fp32 model built first)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
    after = torch.cuda.max_memory_allocated() if on_gpu else rss_bytes("VmHWM")
    predicted = sum(model_state_bytes(n, args.stage, world, args.precision).values())
    measured = [None] * world
    torch.distributed.all_gather_object(measured, after - before)
    if engine.global_rank == 0:
        print(
            json.dumps(
                {
                    "stage": args.stage,
                    "precision": args.precision,
                    "world": world,
                    "params": n,
                    "measured_bytes": measured,
                    "predicted_bytes": predicted,
                }
            ),
            flush=True,
        )
    torch.distributed.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
