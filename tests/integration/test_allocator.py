"""Training commands run on tcmalloc where it is installed, on glibc's malloc when asked, never re-execute in a loop,
and refuse a bad LLMFORGE_ALLOCATOR in one line. The speed-up itself is measured in bench/allocator.py."""

from __future__ import annotations

import os
import sys

import pytest

from llmforge.allocator import find_tcmalloc
from tests.helpers import run_cli, train_rows, write_recipe

needs_tcmalloc = pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (.ci/run installs it)")


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run_dir)}


@needs_tcmalloc
def test_pretrain_runs_on_tcmalloc_unless_asked_for_glibc(tmp_path, prepared):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 6},
        eval={"interval": 0},
        checkpoint={"interval": 0},
    )
    runs = {}
    for name, env in (("tc", {}), ("glibc", {"LLMFORGE_ALLOCATOR": "system"})):
        # the arguments survive the re-execution: run.name and max_steps come from --set
        r = run_cli(
            sys.executable,
            "launch/pretrain.py",
            "--recipe",
            str(recipe),
            "--set",
            f"run.name={name}",
            "--set",
            "train.max_steps=5",
            env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = r.stderr + r.stdout
        assert sorted(losses(tmp_path / "runs" / name)) == [1, 2, 3, 4, 5]
    assert "allocator: tcmalloc (" in runs["tc"] and "libtcmalloc" in runs["tc"]
    assert "allocator: glibc malloc (LLMFORGE_ALLOCATOR=system)" in runs["glibc"]
    assert "tcmalloc (" not in runs["glibc"]
    # the allocator changes where buffers live, never the arithmetic
    assert losses(tmp_path / "runs" / "tc") == losses(tmp_path / "runs" / "glibc")


def test_bad_allocator_is_one_line_and_writes_nothing(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs")
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe), env={"LLMFORGE_ALLOCATOR": "jemalloc"})
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line == "error: LLMFORGE_ALLOCATOR='jemalloc': expected one of tcmalloc, system"
    assert not (tmp_path / "runs").exists()


GUARD = """
import os, sys
from llmforge import allocator
print("start", os.environ.get("LD_PRELOAD", ""), os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"), flush=True)
allocator.find_tcmalloc = lambda: sys.argv[1]
allocator.reexec_with_tcmalloc()
print("allocator", allocator.current(), sys.argv[1:], flush=True)
"""


def test_a_library_the_loader_refuses_is_tried_once(tmp_path):
    """A tcmalloc path the dynamic loader cannot preload: one re-execution (the loader warns and goes on), then the
    command runs on glibc's malloc with its arguments intact, instead of re-executing forever."""
    missing = str(tmp_path / "libtcmalloc_minimal.so.4")
    r = run_cli(
        sys.executable, "-c", GUARD, missing, "x y", env={"LD_PRELOAD": "", "LLMFORGE_ALLOCATOR": ""}, timeout=60
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # the second start carries tcmalloc's settings (no stderr report of large allocations), the arguments intact
    mine = os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")  # the user's setting wins
    assert out == [
        f"start  {mine}",
        f"start {missing} {mine or 1 << 40}",
        f"allocator glibc malloc [{missing!r}, 'x y']",
    ], out
    assert "cannot be preloaded" in r.stderr


@needs_tcmalloc
def test_allocator_bench_launches_the_recipe_under_both(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs")
    out = tmp_path / "result.md"
    r = run_cli(
        sys.executable,
        "bench/allocator.py",
        "--quick",
        "--recipe",
        str(recipe),
        "--pretrain-steps",
        "4",
        "--ranks",
        "1",
        "--set",
        "logging.interval=1",
        "--out",
        str(out),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    for row in (
        "| glibc malloc (LLMFORGE_ALLOCATOR=system) |",
        "| tcmalloc |",
        "- speed-up from tcmalloc: ",
        "the last logged loss of every run is identical",
    ):
        assert row in text, row
