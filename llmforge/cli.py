"""`llmforge <command>`: argument parsing only; each command calls the library function the launch/ scripts use."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional

from llmforge.allocator import reexec_with_tcmalloc
from llmforge.config import load_recipe
from llmforge.config.parallel import make_layout
from llmforge.data.prepare import prepare, train_tokenizer
from llmforge.data.verify import verify_dataset
from llmforge.demo.stdlib_corpus import build_stdlib_corpus
from llmforge.demo.toy_chat import write_toy_sets
from llmforge.errors import UserError, exit_on_user_error, exit_process
from llmforge.eval.harness import run_lm_eval
from llmforge.eval.perplexity import evaluate_checkpoint
from llmforge.model.flops import inactive_params
from llmforge.parity import failed as parity_failed
from llmforge.parity import format_report, parity
from llmforge.plan import count_params, format_plan, loss_chunk_hint, plan, planned_model, suggest_layout
from llmforge.plots import plot_run
from llmforge.posttrain.task import TASKS
from llmforge.tokenizer import load_tokenizer
from llmforge.train.hf_runs import export_hf, import_hf
from llmforge.train.loading import generate_text
from llmforge.train.metrics import summarize
from llmforge.train.run import run_training, setup_logging

PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; rerun with --resume auto to continue


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="YAML recipe file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (
        ("pretrain", "pre-train a model from a recipe (run under deepspeed, torchrun or python)"),
        ("sft", "supervised fine-tuning on chat JSONL, starting from train.init_from"),
        ("dpo", "direct preference optimisation on {prompt, chosen, rejected} JSONL"),
    ):
        p = sub.add_parser(name, help=text)
        _recipe_args(p)
        p.add_argument(
            "--resume",
            default="auto",
            help="auto (newest complete checkpoint, else fresh) | none | PATH (checkpoint or run dir)",
        )
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("train-tokenizer", help="train the recipe's tokenizer on data.sources")
    _recipe_args(p)

    p = sub.add_parser("prepare", help="clean, filter, dedup and tokenize data.sources into data.prepared_dir")
    _recipe_args(p)
    p.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="this job's slice of the inputs (default: SLURM_ARRAY_TASK_ID, else 0)",
    )
    p.add_argument(
        "--num-shards", type=int, default=None, help="number of slices (default: SLURM_ARRAY_TASK_COUNT, else 1)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes on this node")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument(
        "--merge",
        dest="merge",
        action="store_true",
        default=None,
        help="after processing, merge every dataset (global dedup, final shards, manifest)",
    )
    merge.add_argument(
        "--no-merge", dest="merge", action="store_false", help="only process this shard (default when --num-shards > 1)"
    )
    merge.add_argument("--merge-only", action="store_true", help="only merge (all shards must be complete)")

    p = sub.add_parser(
        "verify-data",
        help="check prepared datasets against their manifests: every file's size and sha256, every index, every "
        "token id against the vocabulary (exit 1 on a problem)",
    )
    p.add_argument("datasets", nargs="*", metavar="DIR", help="prepared dataset directories")
    p.add_argument("--recipe", default=None, help="check the recipe's training datasets (with or instead of DIRs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)

    p = sub.add_parser("corpus", help="write the demo corpus (Python standard-library sources) to a directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="stop after this many bytes")

    p = sub.add_parser("plan", help="memory per GPU and time to budget for each ZeRO stage x activation checkpointing")
    _recipe_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs (split as the recipe's parallel section says)")
    p.add_argument("--gpu-memory", required=True, help="memory per GPU, e.g. 80GB")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200: 989)")
    p.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation for the time estimate")

    p = sub.add_parser(
        "parity",
        help="train a few steps under each parallel layout (against one rank) or numerics variant (against a plain "
        "PyTorch fp32 oracle) and compare the per-step loss and gradient norm",
    )
    _recipe_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layouts", default="1,dp2,tp2,sp2", help="comma-separated: 1, dp2, tp2, sp2, tp2.dp2, ...")
    which.add_argument(
        "--variants",
        default=None,
        help="comma-separated, each against the oracle: parts joined by '.' from tpN spN dpN (layout), z0 z1 z2 z3 "
        "z3off (ZeRO config), fp32 bf16 fp16, accN, ckpt-none/full/selective/everyN, compile/nocompile, "
        "tied/untied, fp8/fp8row; e.g. z0.fp32,z2.bf16.acc2.dp2",
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per layout")
    p.add_argument("--out", default=None, help="keep the runs (and parity.json) here; default: a temporary dir")
    p.add_argument(
        "--one-launch",
        action="store_true",
        help="train the variants of one rank count in one launch, one after another (tensor/sequence layouts "
        "still launch alone): the launcher and imports are paid once",
    )

    p = sub.add_parser("toy-chat", help="write a small synthetic SFT set and preference set (JSONL) to a directory")
    p.add_argument("--out", required=True, help="output directory (sft.jsonl, prefs.jsonl)")
    p.add_argument("--n", type=int, default=400, help="examples per file")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("summary", help="first/last val loss and throughput of a run (exit 1 if val loss did not fall)")
    p.add_argument("--run", required=True, help="run directory")

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM directory")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints directory or checkpoint")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")

    p = sub.add_parser("plot", help="write PNG charts of a run's metrics to <run>/plots/")
    p.add_argument("run", help="run directory")

    p = sub.add_parser("import-hf", help="a local Hugging Face Llama directory -> an llmforge run with a checkpoint")
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json, weights, tokenizer.json)")
    p.add_argument("--out", required=True, help="run directory to create")

    p = sub.add_parser("evaluate", help="perplexity of a checkpoint on the val split of each dataset (JSON)")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints directory or checkpoint")
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="DIR",
        help="prepared dataset directory (repeatable; default: the checkpoint's training datasets)",
    )
    p.add_argument("--max-samples", type=int, default=None, help="score at most this many val windows per dataset")
    p.add_argument("--out", default=None, help="JSON path (default: <run dir>/eval/perplexity_step_<N>.json)")

    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a checkpoint (needs llmforge[eval])")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints directory or checkpoint")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="directory of local lm-eval task YAML files")
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON path (default: <run dir>/eval/lm_eval_step_<N>.json)")

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints directory or checkpoint")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context at each step")
    return parser


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in TASKS:
        reexec_with_tcmalloc()  # launch/{pretrain,sft,dpo}.py do this before torch is imported: see allocator.py
        setup_logging()
        status = run_training(args.recipe, args.overrides, args.resume, TASKS[args.command]())["status"]
        exit_process(PREEMPTED if status == "preempted" else 0, synchronize=True)
    elif args.command in ("train-tokenizer", "prepare"):
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "train-tokenizer":
            tok = train_tokenizer(recipe, args.recipe)
            print(f"tokenizer: {recipe.tokenizer.type}, {tok.vocab_size} ids -> {recipe.tokenizer.path}")
        else:
            if args.merge_only:
                prepare(recipe, args.recipe, 0, 1, workers=0, merge=True, only_merge=True, report=print)
            else:
                prepare(recipe, args.recipe, args.shard_index, args.num_shards, args.workers, args.merge, report=print)
    elif args.command == "verify-data":
        dirs = list(args.datasets)
        if args.recipe:
            dirs += [spec.path for spec in load_recipe(args.recipe, args.overrides).data.dataset_dirs()]
        if not dirs:
            raise UserError("verify-data: name dataset directories or --recipe")
        bad = 0
        for directory in dirs:
            problems = verify_dataset(directory)
            bad += len(problems)
            for line in problems:
                print(f"FAIL {line}")
            if not problems:
                print(f"ok {directory}")
        if bad:
            sys.exit(1)
    elif args.command == "corpus":
        files, size = build_stdlib_corpus(args.out, args.max_bytes)
        print(f"corpus: {files} files, {size / 1e6:.1f} MB -> {args.out}")
    elif args.command == "plan":
        text = args.gpu_memory.strip().upper().removesuffix("B").removesuffix("G")
        try:
            memory = float(text)
        except ValueError:
            raise UserError(f"--gpu-memory {args.gpu_memory!r}: expected a size like 80GB") from None
        if args.gpus < 1 or memory <= 0:
            raise UserError("--gpus and --gpu-memory must be positive")
        recipe = load_recipe(args.recipe, args.overrides)
        vocab = recipe.model.vocab_size
        if vocab is None and recipe.tokenizer.path:
            with contextlib.suppress(UserError):
                vocab = load_tokenizer(recipe.tokenizer, args.recipe).vocab_size
        rows = plan(recipe, args.recipe, args.gpus, memory, args.peak_tflops, args.mfu, vocab)
        layout = make_layout(recipe, args.gpus, 0, args.recipe)
        cfg = planned_model(recipe, vocab)
        total = count_params(cfg)[0]
        print(format_plan(rows, total, args.gpus, memory, layout, total - inactive_params(cfg)))
        if suggestion := suggest_layout(recipe, args.recipe, args.gpus, memory, vocab):
            tp, sp, row = suggestion
            experts = f", experts over {layout.expert}" if layout.expert > 1 else ""
            print(
                f"suggested layout: parallel.tensor={tp} parallel.sequence={sp} "
                f"({args.gpus // (tp * sp)} data-parallel{experts}), ZeRO-{row.stage}, activation checkpointing "
                f"{row.checkpointing}: {row.total_gb:.1f} GB per GPU"
            )
        else:
            print(f"suggested layout: none fits {args.gpus} GPUs of {memory:g} GB; add GPUs or shorten data.seq_len")
        hint = loss_chunk_hint(recipe, vocab)
        if hint:
            print(hint)
    elif args.command == "parity":
        oracle = args.variants is not None
        variants = args.variants if oracle else args.layouts
        results = parity(
            args.recipe, args.overrides, variants, args.steps, args.out, oracle=oracle, one_launch=args.one_launch
        )
        print(format_report(results, args.steps, oracle))
        if parity_failed(results):
            sys.exit(1)
    elif args.command == "toy-chat":
        for path in write_toy_sets(args.out, args.n, args.seed):
            print(path)
    elif args.command == "summary":
        s = summarize(args.run)
        print(
            f"steps {s['steps']} | val loss first {_fmt(s['first_val_loss'], '.4f')} -> last "
            f"{_fmt(s['last_val_loss'], '.4f')} | train loss last {_fmt(s['last_train_loss'], '.4f')} | "
            f"median {_fmt(s['median_tokens_per_s'], '.0f')} tokens/s"
        )
        if s["first_val_loss"] is not None and not s["last_val_loss"] < s["first_val_loss"]:
            sys.exit(1)
    elif args.command == "export-hf":
        with contextlib.redirect_stdout(sys.stderr):
            out = export_hf(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} -> {out}")
    elif args.command == "import-hf":
        with contextlib.redirect_stdout(sys.stderr):
            path = import_hf(args.hf, args.out)
        print(f"imported {args.hf} -> {path}")
        exit_process(0)
    elif args.command == "evaluate":
        with contextlib.redirect_stdout(sys.stderr):
            out, report = evaluate_checkpoint(args.checkpoint, args.dataset, args.max_samples, args.out)
        for name, r in report["datasets"].items():
            print(f"{name}: val loss {r['loss']:.4f}, perplexity {r['ppl']:.3f} over {r['tokens']} tokens")
        print(f"-> {out}")
    elif args.command == "lm-eval":
        with contextlib.redirect_stdout(sys.stderr):
            out, report = run_lm_eval(
                args.checkpoint,
                args.tasks.split(","),
                args.include_path,
                args.limit,
                args.num_fewshot,
                args.batch_size,
                args.out,
            )
        for task, metrics in report["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}")
        print(f"-> {out}")
    elif args.command == "plot":
        for path in plot_run(args.run):
            print(path)
    elif args.command == "generate":
        text = generate_text(
            args.checkpoint,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            use_cache=not args.no_cache,
        )
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
