"""`llmforge parity`: train a recipe for a few steps under several parallel layouts and compare each run's per-step
loss and gradient norm with the one-rank run's. A layout that computes another model (a missing reduction, a wrong
shard, positions off by a slice) shows up as a loss or gradient-norm difference beyond the precision's tolerance.

Every layout trains on the same samples in the same order: the global batch is held fixed by giving a layout with d
data-parallel replicas 1/d of the largest data-parallel size's gradient accumulation steps (the reference runs them
all on one rank). Each run is `deepspeed --num_gpus N --module llmforge.cli pretrain` on this node (N = tensor x
sequence x data), with its own run directory under --out.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from llmforge.config import load_recipe
from llmforge.errors import UserError
from llmforge.train.distributed import free_port
from llmforge.train.metrics import read_metrics

# Relative tolerances (loss, gradient norm) per training precision. fp32: summation order is all that differs
# between layouts (measured: <= 1.5e-7 over 20 steps of the test recipe). bf16/fp16: the layouts round partial sums
# (row-parallel outputs, attention over gathered heads, sharded gradients) at different points, and the differences
# grow as the runs drift apart (measured: <= 1.1e-4 loss, 3.1e-3 gradient norm; docs/training.md).
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (2e-3, 2e-2), "fp16": (2e-3, 2e-2)}
_PART = re.compile(r"^(tp|sp|dp)(\d+)$")


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    tensor: int = 1
    sequence: int = 1
    data: int = 1

    @property
    def ranks(self) -> int:
        return self.tensor * self.sequence * self.data


def parse_layouts(text: str) -> list[LayoutSpec]:
    """'1,dp2,tp2,sp2,tp2.dp2' -> layouts; '1' is one rank. One-line error on anything else."""
    specs = []
    for name in (t.strip() for t in text.split(",")):
        sizes = {"tp": 1, "sp": 1, "dp": 1}
        if name != "1":
            seen = set()
            for part in name.split("."):
                m = _PART.match(part)
                if not m or m.group(1) in seen or int(m.group(2)) < 1:
                    raise UserError(
                        f"--layouts {text!r}: {name!r} is not a layout; write '1' or parts like tp2, sp2, dp2 "
                        "joined by '.', e.g. tp2.dp2"
                    )
                seen.add(m.group(1))
                sizes[m.group(1)] = int(m.group(2))
        specs.append(LayoutSpec(name, sizes["tp"], sizes["sp"], sizes["dp"]))
    if len({s.name for s in specs}) != len(specs):
        raise UserError(f"--layouts {text!r}: a layout is named twice")
    return specs


@dataclass
class LayoutResult:
    spec: LayoutSpec
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    error: Optional[str] = None  # the run's last error line when it failed
    loss_diff: float = math.nan  # max relative difference from the reference over the steps
    grad_diff: float = math.nan
    passed: bool = False


def _last_error(output: str) -> str:
    lines = [line for line in output.splitlines() if "error" in line.lower()]
    return (lines[-1] if lines else (output.strip().splitlines() or ["no output"])[-1]).strip()


def run_layout(
    recipe: str, overrides: list[str], spec: LayoutSpec, steps: int, accum: int, warmup: int, out: str
) -> LayoutResult:
    """Train `spec` for `steps` steps in <out>/<spec.name>; its per-step loss and gradient norm."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    sets = [
        *overrides,
        f"parallel.tensor={spec.tensor}",
        f"parallel.sequence={spec.sequence}",
        f"train.max_steps={steps}",
        f"train.warmup_steps={warmup}",
        f"train.grad_accum_steps={accum}",
        f"run.output_dir={out}",
        f"run.name=parity-{spec.name}",
        f"checkpoint.dir={os.path.join(out, f'parity-{spec.name}', 'checkpoints')}",
        "checkpoint.interval=0",
        "logging.interval=1",
        "eval.interval=0",
    ]
    cmd = [launcher, "--num_gpus", str(spec.ranks), "--master_port", str(free_port()), "--no_local_rank"]
    cmd += ["--module", "llmforge.cli", "pretrain", "--recipe", recipe, "--resume", "none"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    result = LayoutResult(spec)
    if proc.returncode != 0:
        result.error = _last_error(proc.stdout + proc.stderr)
        return result
    for row in read_metrics(os.path.join(out, f"parity-{spec.name}")):
        if "loss" in row and "event" not in row:
            result.losses[row["step"]] = row["loss"]
            result.grad_norms[row["step"]] = row["grad_norm"]
    return result


def _rel(a: Optional[float], b: Optional[float]) -> float:
    if a is None or b is None:
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def compare(result: LayoutResult, reference: LayoutResult, tolerances: tuple[float, float], steps: int) -> None:
    """Fill in the result's largest relative differences from the reference and whether both are in tolerance."""
    if result.error is not None or reference.error is not None:
        return
    every = range(1, steps + 1)
    result.loss_diff = max(_rel(result.losses.get(s), reference.losses.get(s)) for s in every)
    result.grad_diff = max(_rel(result.grad_norms.get(s), reference.grad_norms.get(s)) for s in every)
    result.passed = result.loss_diff <= tolerances[0] and result.grad_diff <= tolerances[1]


def parity(
    recipe_path: str, overrides: list[str], layouts: str, steps: int, out: Optional[str] = None
) -> tuple[list[LayoutResult], tuple[float, float], str]:
    """Run every layout (the first is the reference) and compare; (results, tolerances, precision)."""
    specs = parse_layouts(layouts)
    if steps < 1:
        raise UserError(f"--steps {steps}: must be >= 1")
    recipe = load_recipe(recipe_path, overrides)  # a recipe error stops here, before any launch
    if specs[0].ranks != 1:
        specs.insert(0, LayoutSpec("1"))
    largest = max(s.data for s in specs)
    for s in specs:
        if largest % s.data:
            raise UserError(
                f"--layouts {layouts!r}: {s.name} has {s.data} data-parallel replicas, which do not divide the "
                f"largest ({largest}): the layouts could not train on the same global batch"
            )
    precision = recipe.train.precision
    tolerances = TOLERANCES[precision]
    accum = recipe.train.grad_accum_steps * largest
    warmup = min(recipe.train.warmup_steps, steps)
    own_dir = out is None
    out = out or tempfile.mkdtemp(prefix="llmforge-parity-")
    os.makedirs(out, exist_ok=True)
    try:
        results = [
            run_layout(recipe_path, overrides, s, steps, accum // s.data, warmup, os.path.abspath(out)) for s in specs
        ]
    finally:
        if own_dir:
            shutil.rmtree(out, ignore_errors=True)
    reference = results[0]
    for r in results[1:]:
        compare(r, reference, tolerances, steps)
    reference.passed = reference.error is None
    if not own_dir:
        write_json(os.path.join(out, "parity.json"), results, tolerances, precision)
    return results, tolerances, precision


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1e}"


def format_report(results: list[LayoutResult], tolerances: tuple[float, float], precision: str, steps: int) -> str:
    """Per-step differences from the reference, then one pass/fail line per layout."""
    ref, others = results[0], [r for r in results[1:] if r.error is None]
    lines = [
        f"parity over {steps} steps, {precision}: tolerance {tolerances[0]:.0e} (loss), {tolerances[1]:.0e} "
        f"(gradient norm), relative to the 1-rank run",
        "",
        "step  loss (1 rank)  "
        + "  ".join(f"{r.spec.name + ' dloss':>14} {r.spec.name + ' dgrad':>14}" for r in others),
    ]
    if ref.error is None:
        for s in range(1, steps + 1):
            cells = "  ".join(
                f"{_fmt(_rel(r.losses.get(s), ref.losses.get(s))):>14} "
                f"{_fmt(_rel(r.grad_norms.get(s), ref.grad_norms.get(s))):>14}"
                for r in others
            )
            lines.append(f"{s:>4}  {ref.losses.get(s, math.nan):>13.6f}  {cells}")
    lines += ["", f"{'layout':<14}{'ranks':>6}  {'max dloss':>10}  {'max dgrad':>10}  result"]
    for i, r in enumerate(results):
        status = "reference" if i == 0 and r.error is None else ("pass" if r.passed else "FAIL")
        if r.error is not None:
            status = f"FAIL: {r.error}"
        lines.append(f"{r.spec.name:<14}{r.spec.ranks:>6}  {_fmt(r.loss_diff):>10}  {_fmt(r.grad_diff):>10}  {status}")
    return "\n".join(lines)


def write_json(path: str, results: list[LayoutResult], tolerances: tuple[float, float], precision: str) -> None:
    rows = [
        {
            "layout": r.spec.name,
            "ranks": r.spec.ranks,
            "max_loss_rel_diff": None if math.isnan(r.loss_diff) else r.loss_diff,
            "max_grad_norm_rel_diff": None if math.isnan(r.grad_diff) else r.grad_diff,
            "passed": r.passed,
            "error": r.error,
            "losses": r.losses,
            "grad_norms": r.grad_norms,
        }
        for r in results
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"precision": precision, "tolerances": list(tolerances), "layouts": rows}, f, indent=1)
