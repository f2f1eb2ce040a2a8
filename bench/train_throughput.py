"""Training-step throughput of llmforge side by side with two peers, in one process, on the same model dimensions:

  llmforge      the recipe's model and DeepSpeed config through llmforge's Trainer.train_step (guard, stop flag,
                LR schedule included)
  torch         the same GPT module in a plain PyTorch loop: torch.optim.AdamW, bf16 autocast (fp32 weights),
                clip_grad_norm_, no DeepSpeed
  hf+deepspeed  transformers LlamaForCausalLM with the same dimensions, through DeepSpeed with the same config

Each runs `--warmup` steps, then `--steps` timed steps on random tokens, drawn in the step (llmforge's Trainer draws
the next micro-batch meanwhile on its prefetch thread, as it reads shards in training); the median step time gives
tokens/s (and MFU on a known GPU). On GPU a step time is the mean over one round's steps, timed whole with no wait
between them, as training runs (the host queues a step while the GPU finishes the last); each trainer's peak memory
is what it keeps between steps plus the most its own steps add, and `llmforge plan`'s per-GPU total for the recipe
is set against llmforge's (the planner's error). Prints a table with ratios to llmforge and writes it to
bench/results/<device>-<date>-throughput.md (or --out).

    python bench/train_throughput.py --recipe recipes/tiny-char.yaml
    python bench/train_throughput.py --recipe recipes/tiny-char.yaml --compile   # + each compiled
    python bench/train_throughput.py --quick          # a few steps of a tiny model (the test runs this)

With --compile each trainer also runs with its transformer blocks and its loss compiled (torch.compile, in place;
llmforge through `train.compile`), so eager and compiled ratios both come from the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_file import write_result


class RandomTokens:
    """Stands in for PretrainData: random (inputs, targets) of the recipe's shape."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len, self.num_samples, self.fingerprint = vocab, seq_len, 1 << 30, "random"

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(indices.start)
        block = torch.randint(0, self.vocab, (len(indices), self.seq_len + 1), generator=g)
        return block[:, :-1], block[:, 1:]

    @staticmethod
    def tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()


def vocab_size(recipe, origin: str) -> int:
    """The model's vocabulary: the recipe's, else its tokenizer's when it exists, else 256 (char) or 32000 (BPE)."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    from llmforge.errors import UserError
    from llmforge.tokenizer import load_tokenizer

    try:
        return load_tokenizer(recipe.tokenizer, origin).vocab_size
    except UserError:
        return 256 if recipe.tokenizer.type == "char" else 32000


def timed(step, warmup: int, steps: int, sync) -> list[float]:
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def planner_line(recipe, origin: str, vocab: int, stage: int, measured_gb) -> str:
    """`llmforge plan`'s per-GPU total for this recipe on one GPU, against the measured peak where there is one."""
    from llmforge.plan import plan

    mode = recipe.model.activation_checkpointing.mode
    rows = [r for r in plan(recipe, origin, 1, 1e9, vocab_size=vocab) if (r.stage, r.checkpointing) == (stage, mode)]
    if not rows:
        return f"- planner: no row for activation checkpointing {mode!r}"
    predicted = rows[0].total_gb
    what = f"llmforge{' with train.compile' if recipe.train.compile else ''} (ZeRO-{stage}, {mode})"
    if measured_gb is None:
        return f"- planner: {predicted:.3g} GB per GPU predicted for {what}; no GPU to measure"
    return (
        f"- planner: {predicted:.2f} GB per GPU predicted for {what}, "
        f"{measured_gb:.2f} GB measured (max_memory_allocated): error {predicted / measured_gb - 1:+.1%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny-char.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="timed steps split into this many rounds, the contenders taking turns in each (all in memory "
        "at once); 1 = one contender at a time, for models too big to hold three",
    )
    p.add_argument("--compile", action="store_true", help="also time each trainer with compiled blocks and loss")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps (checks the script runs)")
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from llmforge import allocator
    from llmforge.config import load_recipe
    from llmforge.config.deepspeed import compose_ds_config, zero_stage
    from llmforge.config.parallel import Layout
    from llmforge.model import GPT, apply_activation_checkpointing, compile_model
    from llmforge.model.flops import device_peak_flops, flops_per_token
    from llmforge.model.hf import llama_config
    from llmforge.train.distributed import release_shm_segment, setup_env
    from llmforge.train.engine import build_engine, param_groups
    from llmforge.train.guard import FaultInjector
    from llmforge.train.metrics import Metrics
    from llmforge.train.run import seed_everything
    from llmforge.train.task import resolve_model_config
    from llmforge.train.trainer import Objective, TaskData, Trainer, TrainerConfig

    overrides = list(args.overrides)
    if args.quick:
        overrides += [
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "data.seq_len=64",
            "train.micro_batch_size=4",
            "train.warmup_steps=1",
        ]
        args.steps, args.warmup, args.rounds = 3, 1, min(args.rounds, 3)
    recipe = load_recipe(args.recipe, overrides)
    recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, interval=0))
    setup_env()
    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    vocab = vocab_size(recipe, args.recipe)
    recipe = resolve_model_config(recipe, vocab, args.recipe)
    ds_config = compose_ds_config(recipe, 1, "/tmp/llmforge-bench", args.recipe, on_cpu)
    ds_config.pop("tensorboard", None)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    release_shm_segment()
    device = torch.device(accel.device_name(), 0) if not on_cpu else torch.device("cpu")
    sync = (lambda: None) if on_cpu else accel.synchronize
    t, seq = recipe.train, recipe.data.seq_len
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * seq
    data = RandomTokens(vocab, seq)
    ckpt = recipe.model.activation_checkpointing
    if ckpt.mode not in ("none", "full"):
        sys.exit(
            f"error: activation checkpointing {ckpt.mode!r}: HF Llama has only none or full; pass "
            f"--set model.activation_checkpointing.mode=none (or full)"
        )
    seed_everything(0)
    base = GPT(recipe.model)
    n_body = base.num_params(non_embedding=True)
    results = {}

    from transformers import LlamaForCausalLM

    def run_llmforge(compiled: bool):
        model = copy.deepcopy(base)
        # train.fp8 too: the FP8 rows of the GPU suite
        engine = build_engine(model, ds_config, Layout(1), dataclasses.replace(t, compile=compiled), ckpt).engine
        trainer = Trainer(
            engine,
            TrainerConfig.from_recipe(recipe, Layout(1), 0.0, None, FaultInjector()),
            TaskData(data, None),
            Objective.language_modeling(t),
            None,
            Metrics("/tmp", False),
        )

        def release() -> None:
            trainer.batches.close()
            engine.destroy()

        return trainer.train_step, release

    def run_torch(compiled: bool):
        model = apply_activation_checkpointing(copy.deepcopy(base), ckpt).to(device)
        if compiled:
            compile_model(model)
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        position = iter(range(0, 1 << 62, t.micro_batch_size))

        def step() -> None:
            for _ in range(t.grad_accum_steps):
                i = next(position)
                x, y = data.batch(range(i, i + t.micro_batch_size))
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    _, loss = model(x.to(device), y.to(device))
                (loss / t.grad_accum_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, lambda: None

    def run_hf(compiled: bool):
        hf = LlamaForCausalLM(llama_config(recipe.model))
        if ckpt.mode == "full":
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compiled:
            for layer in hf.model.layers:
                layer.compile()
        engine, *_ = deepspeed.initialize(
            model=hf, model_parameters=param_groups(hf, t.weight_decay), config=copy.deepcopy(ds_config)
        )
        position = iter(range(0, 1 << 62, t.micro_batch_size))

        def cross_entropy(logits, targets):
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

        loss_fn = torch.compile(cross_entropy) if compiled else cross_entropy

        def step() -> None:
            for _ in range(t.grad_accum_steps):
                i = next(position)
                x, y = data.batch(range(i, i + t.micro_batch_size))
                out = engine(input_ids=x.to(engine.device), labels=None)
                loss = loss_fn(out.logits, y.to(engine.device))
                engine.backward(loss)
                engine.step()

        return step, engine.destroy  # DeepSpeed's hooks keep an engine alive until it is destroyed

    contenders = [
        (key + (" (compiled)" if compiled else ""), fn, compiled)
        for compiled in ([False, True] if args.compile else [False])
        for key, fn in (("llmforge", run_llmforge), ("torch", run_torch), ("hf+deepspeed", run_hf))
    ]
    # GPU memory of each trainer: what it keeps between steps (weights, gradients, optimizer states, measured across
    # its build and warm-up) plus the most its own timed steps add on top of everything resident then
    gpu = not on_cpu and torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated if gpu else (lambda: 0)
    resident: dict[str, int] = {}
    transient: dict[str, int] = {}

    def prepare(key, build, compiled):
        before = allocated()
        step, release = build(compiled)
        timed(step, args.warmup, 0, sync)  # the optimizer states exist after the first step
        resident[key] = allocated() - before
        results[key] = []
        return step, release

    def segment(key, step, n):
        if not gpu:
            results[key] += timed(step, 0, n, sync)
            return
        torch.cuda.reset_peak_memory_stats()
        floor = allocated()
        sync()  # as training runs: no wait between steps, so the host queues a step while the GPU ends the last
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        results[key].append((time.perf_counter() - start) / n)
        transient[key] = max(transient.get(key, 0), torch.cuda.max_memory_allocated() - floor)

    if args.rounds == 1:  # one contender in memory at a time
        for key, build, compiled in contenders:
            step, release = prepare(key, build, compiled)
            segment(key, step, args.steps)
            release()
            del step, release
            gc.collect()
    else:  # all built, then their timed steps interleaved, so drift in the machine's speed reaches each alike
        steps = {key: prepare(key, build, compiled)[0] for key, build, compiled in contenders}
        per_round = -(-args.steps // args.rounds)
        for _ in range(args.rounds):
            for key, step in steps.items():
                segment(key, step, per_round)

    name = "cpu" if on_cpu else accel.get_device_name().replace(" ", "-")
    peak = None if on_cpu else device_peak_flops(accel.get_device_name())
    fpt = flops_per_token(n_body, recipe.model, seq)
    from importlib.metadata import version

    lines = [
        f"# Training-step throughput, {name}, {datetime.date.today()}",
        "",
        f"Command: `python bench/train_throughput.py --recipe {args.recipe}"
        + "".join(f" --set {o}" for o in args.overrides)
        + (" --compile" if args.compile else "")
        + (f" --steps {args.steps}" if args.steps != 30 and not args.quick else "")
        + (f" --warmup {args.warmup}" if args.warmup != 5 and not args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds != 6 else "")
        + (" --quick" if args.quick else "")
        + "`; "
        f"torch {version('torch')}, deepspeed {version('deepspeed')}, transformers {version('transformers')}, "
        f"{os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}, "
        f"allocator: {allocator.current()}.",
        f"Model: {recipe.model.d_model} d_model, {recipe.model.n_layers} layers, {recipe.model.n_heads} heads "
        f"({recipe.model.n_kv_heads or recipe.model.n_heads} kv), vocab {vocab}, {n_body / 1e6:.2f}M "
        f"non-embedding parameters; {t.micro_batch_size} x {seq} tokens x {t.grad_accum_steps} accumulation "
        f"per step; ZeRO-{zero_stage(ds_config)}, {t.precision}, activation checkpointing {ckpt.mode}, "
        f"1 process. Median of {len(results['llmforge'])} "
        + ("steps" if not gpu else "rounds' mean step times (each round timed whole: no wait between its steps)")
        + f" after {args.warmup} warm-up steps"
        + (f", the contenders taking turns in {args.rounds} rounds." if args.rounds > 1 else ", one after the other."),
        "",
        "| trainer | median step s | tokens/s | MFU | peak GB | llmforge speed-up over it (same mode) |",
        "|---|---|---|---|---|---|",
    ]
    peak_gb = {key: (resident[key] + transient[key]) / 1024**3 for key in transient}
    for key, times in results.items():
        med = statistics.median(times)
        tps = tokens_per_step / med
        mfu = f"{fpt * tps / peak:.1%}" if peak else "n/a"
        mem = f"{peak_gb[key]:.2f}" if key in peak_gb else "n/a"
        ref = statistics.median(results["llmforge (compiled)" if "compiled" in key else "llmforge"])
        lines.append(f"| {key} | {med:.4f} | {tps:,.0f} | {mfu} | {mem} | {med / ref:.2f}x |")
    med = {key: statistics.median(times) for key, times in results.items()}
    lines += [
        "",
        f"- framework overhead against the plain PyTorch loop (eager): "
        f"{med['llmforge'] / med['torch'] - 1:+.1%} step time",
    ]
    if args.compile:
        lines.append(
            f"- llmforge with train.compile against HF Llama + DeepSpeed as it ships (eager): "
            f"{med['hf+deepspeed'] / med['llmforge (compiled)']:.2f}x tokens/s"
        )
    for compiled in [False, True] if args.compile else [False]:  # the plan of each llmforge contender
        planned = dataclasses.replace(recipe, train=dataclasses.replace(t, compile=compiled))
        lines.append(
            planner_line(
                planned,
                args.recipe,
                vocab,
                zero_stage(ds_config),
                peak_gb.get("llmforge (compiled)" if compiled else "llmforge"),
            )
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(text, args.out, f"{name}-{datetime.date.today()}-throughput.md")
    sys.stdout.flush()
    os._exit(0)  # see llmforge.errors.exit_process: no interpreter finalisation after gloo


if __name__ == "__main__":
    main()
