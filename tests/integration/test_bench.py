"""The benchmarks run in quick mode and print their tables (no timing asserts: figures come from full runs)."""

from __future__ import annotations

import sys

import pytest

from llmforge.allocator import find_tcmalloc
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "script,args,rows",
    [
        ("bench/train_throughput.py", [], ["| llmforge |", "| torch |", "| hf+deepspeed |", "- planner: "]),
        (
            "bench/activation_ckpt.py",
            ["--loss-chunk", "64", "--compile"],
            [
                "| none |",
                "| full |",
                "| every_k (k=2) |",
                "| selective |",
                "| none + loss_chunk 64 |",
                "| full + loss_chunk 64 |",
                "| none + train.compile |",
                "| none + loss_chunk 64 + train.compile |",
            ],
        ),
        (
            "bench/lm_loss.py",
            [],
            ["| eager |", "| train.compile |", "| loss_chunk 96 |", "| loss_chunk 96 + train.compile |"],
        ),
        ("bench/data_loader.py", [], ["| open a dataset of 500 shard files", "tokens/s per rank"]),
        (
            "bench/html_extraction.py",
            [],
            [
                "| python-docs (5) | resiliparse, C4 line rules |",
                "| debian-faq (5) | trafilatura, line rules without terminal punctuation |",
                "| en (",
                "| de (",
            ],
        ),
        (
            "bench/data_pipeline.py",
            [],
            [
                "| llmforge, trafilatura (its default; the stages datatrove runs) |",
                "| llmforge, resiliparse |",
                "| 2 |",
            ],
        ),
        ("bench/parallel_layouts.py", [], ["| 1 | 1 |", "| sp2 | 2 |"]),
        (
            "bench/document_mask.py",
            [],
            ["| 256 | 128 | causal SDPA |", "| 2048 | 512 | document: SDPA per document (llmforge, CPU) |"],
        ),
        ("bench/language_id.py", [], ["| fastText lid.176 (.ftz; llmforge) |", "| de (20) |", "| zh (20) |"]),
        ("bench/data_stages.py", [], ["| constant | 8 |", "| constant | 12 |", "| anneal | 12 |"]),
        (
            "bench/moe.py",
            [],
            [
                "| dense (tiny-char) | float32 |",
                "| moe-tiny, grouped GEMM | bfloat16 |",
                "| moe-tiny, loop over experts |",
            ],
        ),
        pytest.param(
            "bench/allocator.py",
            [],
            ["| llmforge |", "| hf+deepspeed |", "as it launches (tcmalloc)"],
            marks=pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed"),
        ),
    ],
)
def test_bench_quick_mode_prints_its_table(tmp_path, script, args, rows):
    out = tmp_path / "result.md"
    r = run_cli(sys.executable, script, "--quick", *args, "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in rows:
        assert row in r.stdout and row in out.read_text(), row
