"""The C memory allocator's effect on CPU training steps: bench/train_throughput.py (llmforge, the plain PyTorch loop,
HF Llama + DeepSpeed, in one process) run under glibc's malloc and under tcmalloc, the two taking turns run by run
so drift in the machine's speed reaches both alike.

llmforge's training commands preload tcmalloc where it is installed (llmforge/allocator.py); HF + DeepSpeed launched
the usual way run on glibc's malloc. Besides each trainer's speed-up from tcmalloc, the table gives llmforge as it
launches (tcmalloc) against HF + DeepSpeed as it launches (glibc): step times from different processes, so its
ratio carries the run-to-run spread the per-run rows show.

    python bench/allocator.py --recipe recipes/tiny-char.yaml --runs 3
    python bench/allocator.py --recipe recipes/tiny-char.yaml --runs 3 --pretrain-steps 200  # + the real launch
    python bench/allocator.py --quick          # one quick run each (the test runs this)

With --pretrain-steps N it also runs the recipe itself as users do, `deepspeed --num_gpus R launch/pretrain.py`
(R = --ranks, the demo's 2 CPU ranks by default), N steps under each allocator, alternating, and reports the tokens/s
its metrics.jsonl logs after the first logging interval (the recipe's data must be prepared: `make demo` does it for
tiny-char). Writes bench/results/cpu-<date>-allocator.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from results_file import write_result  # noqa: E402

from llmforge.allocator import TCMALLOC_ENV, find_tcmalloc  # noqa: E402
from llmforge.train.metrics import read_metrics  # noqa: E402

TRAINERS = ("llmforge", "torch", "hf+deepspeed")


def environment(kind: str, lib: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    kept = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "tcmalloc" not in p]
    if kind == "tcmalloc":
        kept.insert(0, lib)
        env.update({k: v for k, v in TCMALLOC_ENV.items() if k not in os.environ})
    if kept:
        env["LD_PRELOAD"] = " ".join(kept)
    return env


def one_run(kind: str, lib: str, args, extra: list[str]) -> tuple[dict, str]:
    """Median step seconds per trainer from one bench/train_throughput.py process, and its allocator line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.md")
        cmd = [
            sys.executable,
            os.path.join(ROOT, "bench", "train_throughput.py"),
            "--recipe",
            args.recipe,
            "--out",
            out,
            *extra,
        ]
        r = subprocess.run(cmd, env=environment(kind, lib), capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed under {kind}:\n{r.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            text = f.read()
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| ([\w+]+) \| ([\d.]+) \|", text, re.M)}
    if set(steps) != set(TRAINERS):
        sys.exit(f"error: unexpected table from bench/train_throughput.py under {kind}:\n{text}")
    line = re.search(r"allocator: ([^;.]+)", text)
    return steps, line.group(1) if line else "?"


def one_launch(kind: str, lib: str, args, tmp: str, i: int) -> tuple[float, float]:
    """Median tokens/s over the logged intervals after the first (start-up) one, and the last logged loss, of one real
    `deepspeed launch/pretrain.py` run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"{kind}-{i}"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_gpus",
        str(args.ranks),
        "--master_port",
        str(port),
        "launch/pretrain.py",
        "--recipe",
        args.recipe,
        "--resume",
        "none",
        *[x for o in args.overrides for x in ("--set", o)],
        "--set",
        f"run.output_dir={tmp}",
        "--set",
        f"run.name={name}",
        "--set",
        f"train.max_steps={args.pretrain_steps}",
        "--set",
        "eval.interval=0",
        "--set",
        "checkpoint.interval=0",
        "--set",
        "logging.tensorboard=false",
    ]
    env = environment(kind, lib)
    env["LLMFORGE_ALLOCATOR"] = kind
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed under {kind}:\n{log[-2000:]}")
    if ("allocator: tcmalloc (" in log) != (kind == "tcmalloc"):
        sys.exit(f"error: the launched run did not get the allocator asked for ({kind})")
    rows = [r for r in read_metrics(os.path.join(tmp, name)) if "tokens_per_s" in r and "event" not in r]
    if len(rows) < 2:
        sys.exit(f"error: --pretrain-steps {args.pretrain_steps} logs fewer than 2 intervals; raise it")
    return statistics.median(r["tokens_per_s"] for r in rows[1:]), rows[-1]["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny-char.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--runs", type=int, default=3, help="bench/train_throughput.py runs per allocator")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="also run the recipe through deepspeed launch/pretrain.py for this many steps per run",
    )
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks of that launch")
    p.add_argument("--quick", action="store_true", help="one quick run per allocator (checks the script runs)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lib = find_tcmalloc()
    if lib is None:
        sys.exit("error: tcmalloc not found (Debian/Ubuntu: apt-get install libtcmalloc-minimal4; conda: gperftools)")
    extra = [x for o in args.overrides for x in ("--set", o)]
    extra += ["--quick"] if args.quick else ["--steps", str(args.steps)]
    runs = 1 if args.quick else args.runs

    kinds = ("system", "tcmalloc")
    steps: dict[str, list[dict]] = {k: [] for k in kinds}
    seen: dict[str, str] = {}
    for i in range(runs):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            result, seen[kind] = one_run(kind, lib, args, extra)
            steps[kind].append(result)
            print(f"run {i + 1} {kind}: " + ", ".join(f"{t} {s * 1e3:.1f} ms" for t, s in result.items()), flush=True)
    if "tcmalloc" not in seen["tcmalloc"] or "tcmalloc" in seen["system"]:
        sys.exit(f"error: the runs did not get the allocator asked for: {seen}")

    med = {k: {t: statistics.median(r[t] for r in steps[k]) for t in TRAINERS} for k in kinds}
    from importlib.metadata import version

    lines = [
        f"# Memory allocator and CPU training steps, {datetime.date.today()}",
        "",
        f"Command: `python bench/allocator.py --recipe {args.recipe}"
        + "".join(f" --set {o}" for o in args.overrides)
        + (" --quick" if args.quick else f" --runs {args.runs} --steps {args.steps}")
        + (f" --pretrain-steps {args.pretrain_steps}" if args.pretrain_steps else "")
        + (f" --ranks {args.ranks}" if args.ranks != 2 else "")
        + "`: "
        f"bench/train_throughput.py {runs} time(s) under each allocator, alternating; glibc = {seen['system']}, "
        f"tcmalloc = {seen['tcmalloc']}; torch {version('torch')}, deepspeed {version('deepspeed')}, "
        f"{os.cpu_count()} CPU cores visible. Step time: median over runs of each run's median step.",
        "",
        "| trainer | glibc malloc step s | tcmalloc step s | speed-up from tcmalloc | runs (glibc / tcmalloc, ms) |",
        "|---|---|---|---|---|",
    ]
    for t in TRAINERS:
        per_run = " / ".join(", ".join(f"{r[t] * 1e3:.0f}" for r in steps[k]) for k in kinds)
        lines.append(
            f"| {t} | {med['system'][t]:.4f} | {med['tcmalloc'][t]:.4f} | "
            f"{med['system'][t] / med['tcmalloc'][t]:.2f}x | {per_run} |"
        )
    lines += [
        "",
        f"- llmforge as it launches (tcmalloc) against HF Llama + DeepSpeed as it launches (glibc malloc): "
        f"{med['system']['hf+deepspeed'] / med['tcmalloc']['llmforge']:.2f}x tokens/s",
        f"- same allocator, llmforge against HF Llama + DeepSpeed: "
        f"{med['system']['hf+deepspeed'] / med['system']['llmforge']:.2f}x under glibc, "
        f"{med['tcmalloc']['hf+deepspeed'] / med['tcmalloc']['llmforge']:.2f}x under tcmalloc",
    ]
    if args.pretrain_steps:
        tps: dict[str, list[float]] = {k: [] for k in kinds}
        last: dict[str, set] = {k: set() for k in kinds}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(runs):
                for kind in kinds if i % 2 == 0 else kinds[::-1]:
                    rate, loss = one_launch(kind, lib, args, tmp, i)
                    tps[kind].append(rate)
                    last[kind].add(loss)
                    print(f"launch {i + 1} {kind}: {rate:,.0f} tokens/s, last loss {loss:.4f}", flush=True)
        rate = {k: statistics.median(tps[k]) for k in kinds}
        same = "identical" if len(last["system"] | last["tcmalloc"]) == 1 else "NOT identical"
        lines += [
            "",
            f"The recipe as users run it: `deepspeed --num_gpus {args.ranks} launch/pretrain.py --recipe "
            f"{args.recipe}`, {args.pretrain_steps} steps, {runs} run(s) per allocator, alternating; "
            "tokens/s (all ranks) is the median of the logged intervals after the first, median over runs.",
            "",
            "| allocator | tokens/s | runs |",
            "|---|---|---|",
        ]
        for k, label in (("system", "glibc malloc (LLMFORGE_ALLOCATOR=system)"), ("tcmalloc", "tcmalloc")):
            lines.append(f"| {label} | {rate[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in tps[k])} |")
        losses = ", ".join(f"{x:.4f}" for x in sorted(last["system"] | last["tcmalloc"]))
        lines += [
            "",
            f"- speed-up from tcmalloc: {rate['tcmalloc'] / rate['system']:.2f}x tokens/s; the last logged "
            f"loss of every run is {same} ({losses})",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(text, args.out, f"cpu-{datetime.date.today()}-allocator.md")


if __name__ == "__main__":
    main()
