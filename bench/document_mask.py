"""Document-masked attention (model.attention_mask: document) against causal attention over packed windows.

Kernels (in process, one core's worth of torch threads): forward + backward of attention alone, fp32, batch 1, 8
query and 4 key/value heads of 64, at 256 / 1024 / 2048 tokens: causal SDPA; llmforge's CPU path (causal SDPA on
each document's slice); SDPA with the boolean same-document mask (the path on other devices). Windows pack documents
of a fixed length (--doc-tokens: 128 and 512), so the per-document path runs T / length slices.

Quality (`--quality`): the demo's model (recipes/tiny-char.yaml) on the stdlib corpus cut into documents of at most
--doc-chars characters (real text; data.chunk_chars), trained --steps steps on 2 ranks with causal and with
document-masked attention, the same seed, data and tokens: validation loss at every eval interval, each run scored
with its own attention.

    python bench/document_mask.py                          # kernels
    python bench/document_mask.py --quality --steps 600    # two 2-rank runs
    python bench/document_mask.py --quick                  # 2 timed steps per row (the test runs this)

Writes bench/results/cpu-<date>-document-mask[-quality].md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402

from llmforge.model.gpt import document_attention  # noqa: E402
from llmforge.train.distributed import free_port  # noqa: E402


def seconds(fn, q, k, v, steps: int) -> float:
    times = []
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    for i in range(steps + 2):
        for t in (q, k, v):
            t.grad = None
        sync()
        started = time.perf_counter()
        fn(q, k, v).sum().backward()
        sync()
        if i > 1:  # the first two are a warm-up (on CUDA, flex_attention compiles in the first)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernels(steps: int, doc_sizes: list[int], device: str) -> list[str]:
    rows = []
    own = "flex_attention + block mask (llmforge, CUDA)" if device == "cuda" else "SDPA per document (llmforge, CPU)"
    for doc_tokens, T in [(d, T) for d in doc_sizes for T in (256, 1024, 2048)]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, T, 64, generator=g).to(device).requires_grad_() for h in (8, 4, 4))
        documents = (torch.arange(T) // doc_tokens)[None].to(device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = (documents[:, None, :, None] == documents[:, None, None, :]) & causal
        paths = {
            "causal SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            f"document: {own}": lambda q, k, v, d=documents: document_attention(q, k, v, d),
            "document: SDPA + boolean mask": lambda q, k, v, m=mask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, enable_gqa=True
            ),
        }
        base = None
        for name, fn in paths.items():
            s = seconds(fn, q, k, v, steps)
            base = base or s
            rows.append(f"| {T} | {doc_tokens} | {name} | {s * 1000:.1f} | {s / base:.2f}x |")
    return [
        f"Kernels: forward + backward, fp32, 8 query / 4 key-value heads of 64, windows packed with documents of the "
        f"given length, median of {steps} steps, "
        + (torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} torch threads")
        + ".",
        "",
        "| tokens | document length | attention | ms | vs causal |",
        "|---|---|---|---|---|",
        *rows,
    ]


def train(recipe: str, steps: int, name: str, out: str, mask: str) -> list[dict]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
    cmd += ["--recipe", recipe, "--resume", "none"]
    sets = [f"train.max_steps={steps}", f"eval.interval={max(1, steps // 6)}", f"run.output_dir={out}"]
    sets += [f"run.name={name}", "checkpoint.interval=0", f"model.attention_mask={mask}", "eval.batches=40"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(os.path.join(out, name, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def quality(steps: int, doc_chars: int) -> list[str]:
    from llmforge.config import load_recipe
    from llmforge.data.prepare import prepare, train_tokenizer

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(ROOT, "recipes", "tiny-char.yaml"), encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        corpus = os.path.join(ROOT, "data", "stdlib-corpus")
        if not os.path.isdir(corpus):
            raise SystemExit(f"{corpus} is missing: run `make demo` (or its corpus step) first")
        raw["data"]["sources"][0]["paths"] = [os.path.join(corpus, "*.txt")]
        raw["data"]["prepared_dir"] = os.path.join(tmp, "prepared")
        raw["data"]["chunk_chars"] = doc_chars
        raw["tokenizer"]["path"] = os.path.join(tmp, "prepared", "tokenizer.json")
        raw["deepspeed"]["config"] = os.path.join(ROOT, "ds_configs", "zero2.json")
        recipe = os.path.join(tmp, "recipe.yaml")
        with open(recipe, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f)
        loaded = load_recipe(recipe)
        train_tokenizer(loaded, recipe, progress=False)
        manifest = prepare(loaded, recipe, progress=False)["stdlib"]
        runs = {mask: train(recipe, steps, mask, tmp, mask) for mask in ("causal", "document")}
    evals = sorted({r["step"] for rows in runs.values() for r in rows if "val_loss" in r})
    train_tokens = manifest["splits"]["train"]["tokens"]
    documents = manifest["splits"]["train"]["documents"]
    lines = [
        f"Quality: recipes/tiny-char.yaml, {steps} steps each on 2 ranks, the stdlib corpus in documents of at most "
        f"{doc_chars} characters ({documents} train documents, {train_tokens / documents:.0f} tokens each on "
        f"average; windows of {raw['data']['seq_len']} tokens), {time.time() - started:.0f} s in all.",
        "",
        "| step | causal val loss | document-masked val loss |",
        "|---|---|---|",
    ]
    for s in evals:
        vals = [
            next((r["val_loss"] for r in rows if r.get("step") == s and "val_loss" in r), None)
            for rows in runs.values()
        ]
        lines.append(f"| {s} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", action="store_true")
    p.add_argument("--steps", type=int, default=600, help="training steps per run (--quality)")
    p.add_argument("--doc-chars", type=int, default=512, help="--quality: longest document (data.chunk_chars)")
    p.add_argument("--doc-tokens", type=int, nargs="+", default=[128, 512], help="kernels: tokens per packed document")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="kernels: where they run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.chdir(ROOT)
    command = "python bench/document_mask.py" + (f" --quality --steps {args.steps}" if args.quality else "")
    lines = [
        f"# Document-masked vs causal attention, {datetime.date.today()}",
        "",
        f"Command: `{command}` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}.",
        "",
    ]
    if args.quality:
        lines += quality(args.steps, args.doc_chars)
    else:
        lines += kernels(2 if args.quick else 10, args.doc_tokens, args.device)
    text = "\n".join(lines) + "\n"
    name = f"{'gpu' if args.device == 'cuda' else 'cpu'}-{datetime.date.today()}-document-mask"
    name += f"{'-quality' if args.quality else ''}.md"
    path = write_result(text, args.out, name)
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
