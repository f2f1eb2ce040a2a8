"""The LM head and loss on their own, each way llmforge can compute them: eager (the loss keeps the fp32
log-softmax), compiled (`train.compile`: a fused fp32 cross-entropy), chunked (`train.loss_chunk`), and chunked +
compiled. One forward + backward of the head (d_model -> vocab, bf16 weights) and loss over N tokens of random bf16
hidden states, the variants taking turns in rounds in one process.

Memory: the bytes autograd keeps for backward (distinct storages, the weight and the input excluded) against the
planner's count for the logits (`llmforge plan`, kept part), and on GPU the peak allocated over the step above what
was allocated before it against the planner's count with its transients (the logits' gradients).

    python bench/lm_loss.py --tokens 4096 --d-model 256 --vocab 32000 --chunk 1024
    python bench/lm_loss.py --quick          # the test runs this
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
from results_file import write_result

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (batch x sequence)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk for the chunked variants")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 steps (checks the script runs)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.tokens, args.d_model, args.vocab, args.chunk, args.steps, args.rounds = 256, 32, 1000, 96, 2, 1

    from llmforge.config.recipe import ModelConfig
    from llmforge.model import GPT
    from llmforge.plan import logits_bytes

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    n, d, vocab = args.tokens, args.d_model, args.vocab
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=n, d_model=d, n_layers=1, n_heads=max(1, d // 64))
    torch.manual_seed(0)
    base = GPT(cfg).to(device, torch.bfloat16)
    h = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device=device)
    compiled = GPT(cfg).to(device, torch.bfloat16)
    compiled.load_state_dict(base.state_dict())
    compiled.loss.compile()
    variants = {
        "eager": (base, 0),
        "train.compile": (compiled, 0),
        f"loss_chunk {args.chunk}": (base, args.chunk),
        f"loss_chunk {args.chunk} + train.compile": (compiled, args.chunk),
    }

    def step(model: GPT, chunk: int) -> tuple[torch.Tensor, int]:
        """One forward + backward; the bytes kept for backward."""
        x = h.clone().requires_grad_()
        skip = {x.untyped_storage().data_ptr()} | {q.untyped_storage().data_ptr() for q in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in skip:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model.head_loss(x, targets, chunk)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach(), sum(kept.values())

    times: dict[str, list[float]] = {k: [] for k in variants}
    kept: dict[str, int] = {}
    peak: dict[str, int] = {}
    losses: dict[str, float] = {}
    for name, (model, chunk) in variants.items():  # warm-up (compilation), kept bytes, GPU peak
        for _ in range(2):
            loss, kept[name] = step(model, chunk)
        losses[name] = loss.item()
        if gpu:
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(model, chunk)
            sync()
            peak[name] = torch.cuda.max_memory_allocated() - before
    per_round = -(-args.steps // args.rounds)
    for _ in range(args.rounds):
        for name, (model, chunk) in variants.items():
            for _ in range(per_round):
                sync()
                start = time.perf_counter()
                step(model, chunk)
                sync()
                times[name].append(time.perf_counter() - start)

    from importlib.metadata import version

    dev_name = torch.cuda.get_device_name().replace(" ", "-") if gpu else "cpu"
    mb = 2**20
    lines = [
        f"# LM head + loss, {dev_name}, {datetime.date.today()}",
        "",
        f"Command: `python bench/lm_loss.py --tokens {n} --d-model {d} --vocab {vocab} --chunk {args.chunk}"
        + (" --quick" if args.quick else "")
        + f"`; torch {version('torch')}, {os.cpu_count()} CPU cores "
        f"visible, torch threads {torch.get_num_threads()}. Forward + backward of the bf16 head and the fp32 "
        f"loss over {n} tokens; median of {len(times['eager'])} steps after 2 warm-up steps, the variants "
        f"taking turns in {args.rounds} rounds. Kept: bytes autograd keeps for backward (the weight and the "
        "input excluded); planned: `llmforge plan`'s count for the logits (kept part; with its transients "
        "against the GPU peak).",
        "",
        "| variant | step ms | vs eager | loss | kept MB | planned kept MB | GPU peak MB | planned peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = statistics.median(times["eager"])
    for name, (model, chunk) in variants.items():
        med = statistics.median(times[name])
        comp = model is compiled
        planned_peak = logits_bytes(n, vocab, 2, chunk, comp, True)
        gpu_cols = f"{peak[name] / mb:.1f} | {planned_peak / mb:.1f}" if gpu else "n/a | n/a"
        lines.append(
            f"| {name} | {med * 1e3:.1f} | {med / ref:.2f}x | {losses[name]:.4f} | {kept[name] / mb:.1f} | "
            f"{logits_bytes(n, vocab, 2, chunk, comp, False) / mb:.1f} | {gpu_cols} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(text, args.out, f"{dev_name}-{datetime.date.today()}-lm-loss.md")


if __name__ == "__main__":
    main()
