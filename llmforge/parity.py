"""`llmforge parity`: train a recipe for a few steps under several variants and compare each run's per-step loss
and gradient norm with a reference. A variant that computes another model (a missing reduction, a wrong shard, a
dropped micro-batch, an optimizer that steps on the wrong state) shows up as a loss or gradient-norm difference
beyond its precision's tolerance.

Two references:
- `--layouts 1,dp2,tp2,...`: the one-rank DeepSpeed run of the same recipe (layouts against one rank, in the
  recipe's own precision and ZeRO stage);
- `--variants z0.fp32,z2.bf16.acc2.dp2,...`: the oracle (train/oracle.py), the same steps in plain PyTorch, fp32,
  no DeepSpeed, so a defect of the DeepSpeed path every layout shares is seen too.

A variant is parts joined by '.': a layout (tpN, spN, dpN; '1' alone is one rank), a ZeRO config (z0, z1, z2, z3,
z3off: zero0.json ... zero3_offload.json beside the recipe's deepspeed.config), a precision (fp32, bf16, fp16),
accumulation steps (accN), activation checkpointing (ckpt-none, ckpt-full, ckpt-selective, ckpt-everyN),
compile / nocompile, tied / untied embeddings, fp8 / fp8row (train.fp8.scaling tensorwise / rowwise). What a
variant leaves out comes from the recipe.

Every run trains on the same samples in the same order: the global batch is held fixed (the recipe's micro-batch x
accumulation x the largest data-parallel size among the variants); a variant with d replicas runs 1/d of the
accumulation steps, or with accN the micro-batch global / (N x d). Each run is `deepspeed --num_gpus N --module
llmforge.cli pretrain` on this node (N = tensor x sequence x data), with its own run directory under --out; the
spike guard is off in every run (parity compares numerics, not the guard's decisions). A variant llmforge refuses
(ZeRO-0 with bf16, a layout that does not divide) is reported with its one-line reason, without a launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

from llmforge.config import load_recipe
from llmforge.config.deepspeed import compose_ds_config, resolve_precision
from llmforge.config.parallel import Layout
from llmforge.errors import UserError
from llmforge.train.distributed import free_port
from llmforge.train.metrics import read_metrics
from llmforge.train.oracle import check_oracle_recipe, oracle_steps
from llmforge.train.run import run_training, setup_logging

# Relative tolerances (loss, gradient norm) per training precision.
# Layouts against one rank (docs/training.md): fp32 differs by summation order only (measured <= 1.5e-7 over 20
# steps of the test recipe); bf16/fp16 layouts round partial sums at different points (measured <= 1.1e-4 loss,
# 3.1e-3 gradient norm).
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (2e-3, 2e-2), "fp16": (2e-3, 2e-2)}
# Every DeepSpeed path against the fp32 oracle, for parity's default 20 steps (bench/results/
# cpu-2026-12-07-numerics.md; the largest difference measured over 37 variants x 20 steps, then a margin of 4-12x):
# fp32 differs by summation order and kernels (fused vs for-loop AdamW; measured <= 1.6e-7 loss, 3.2e-7 gradient
# norm); bf16 by the rounding of weights, activations and gradients (<= 4.9e-4, 3.2e-3), FP8 matmuls by their
# float8 casts on top (<= 5.7e-4, 7.5e-3). ZeRO-0 + bf16, which trains another model, was 2.4e-3 off after one
# update and 1.3e-2 / 8.5e-2 at most over 20 steps. Over hundreds of steps runs drift apart like any two chaotic
# trajectories (300 steps: fp32 3.9e-6, bf16 1.7e-2 at some step): compare long runs by a window's mean loss.
ORACLE_TOLERANCES = {"fp32": (2e-6, 2e-5), "bf16": (2e-3, 2e-2), "fp16": (2e-3, 2e-2), "fp8": (3e-3, 5e-2)}
_PART = re.compile(r"^(tp|sp|dp|ep|acc)(\d+)$")
_ZERO = {"z0": "zero0.json", "z1": "zero1.json", "z2": "zero2.json", "z3": "zero3.json", "z3off": "zero3_offload.json"}
_CKPT = re.compile(r"^ckpt-(none|full|selective|every(\d+))$")
_FLAGS = {
    "fp32": ("precision", "fp32"),
    "bf16": ("precision", "bf16"),
    "fp16": ("precision", "fp16"),
    "compile": ("compile", True),
    "nocompile": ("compile", False),
    "tied": ("tied", True),
    "untied": ("tied", False),
    "fp8": ("fp8", "tensorwise"),
    "fp8row": ("fp8", "rowwise"),
}


@dataclass(frozen=True)
class LayoutSpec:
    """One run of the comparison: a layout and the numerics settings it changes from the recipe."""

    name: str
    layout: Layout = Layout(1)  # its world is the ranks the variant launches
    zero: Optional[str] = None  # a shipped DeepSpeed config's name (zero2.json, ...)
    precision: Optional[str] = None
    accum: Optional[int] = None
    checkpointing: Optional[str] = None  # none | full | selective | every_k:K
    compile: Optional[bool] = None
    tied: Optional[bool] = None
    fp8: Optional[str] = None  # tensorwise | rowwise

    @property
    def ranks(self) -> int:
        return self.layout.world

    @property
    def data(self) -> int:
        return self.layout.data

    def sets(self) -> list[str]:
        """The --set overrides this variant adds to the recipe (layout, ZeRO config, numerics)."""
        out = self.layout.recipe_sets()
        if self.zero is not None:
            out.append(f"deepspeed.config=llmforge:{self.zero}")  # the shipped config
        if self.precision is not None:
            out.append(f"train.precision={self.precision}")
        if self.checkpointing is not None:
            mode, _, every = self.checkpointing.partition(":")
            out.append(f"model.activation_checkpointing.mode={mode}")
            if every:
                out.append(f"model.activation_checkpointing.every={every}")
        if self.compile is not None:
            out.append(f"train.compile={str(self.compile).lower()}")
        if self.fp8 is not None:
            out.append(f"train.fp8.scaling={self.fp8}")
        return [*out, *self.model_sets()]

    def model_sets(self) -> list[str]:
        """The overrides that change the model itself (the oracle trains the same one)."""
        return [] if self.tied is None else [f"model.tie_embeddings={str(self.tied).lower()}"]


def parse_layouts(text: str) -> list[LayoutSpec]:
    """'1,dp2,tp2.sp2,z3.bf16.acc2.dp2' -> specs ('1' is one rank). One-line error on anything else."""
    specs = []
    for name in (t.strip() for t in text.split(",")):
        fields: dict = {"tensor": 1, "sequence": 1, "data": 1}
        if name != "1":
            seen: set[str] = set()
            for part in name.split("."):
                key, value = _parse_part(part)
                if key is None or key in seen:
                    raise UserError(
                        f"{text!r}: {name!r} is not a variant; write '1' or parts joined by '.': tpN, spN, dpN, epN "
                        f"(layout), {', '.join(_ZERO)} (ZeRO config), fp32/bf16/fp16, accN, "
                        "ckpt-none/full/selective/everyN, compile/nocompile, tied/untied, fp8/fp8row; "
                        "e.g. tp2.dp2, z3.bf16.acc2"
                    )
                seen.add(key)
                fields[key] = value
        sizes = {k: fields.pop(k) for k in ("tensor", "sequence", "data", "expert") if k in fields}
        data = sizes.pop("data")
        if sizes.get("expert", 1) > 1 and data == 1:
            data = sizes["expert"]  # epN alone implies dpN
        world = data * sizes["tensor"] * sizes["sequence"]
        specs.append(LayoutSpec(name, Layout(world, **sizes), **fields))
    if len({s.name for s in specs}) != len(specs):
        raise UserError(f"{text!r}: a variant is named twice")
    return specs


def _parse_part(part: str) -> tuple[Optional[str], object]:
    if m := _PART.match(part):
        value = int(m.group(2))
        key = {"tp": "tensor", "sp": "sequence", "dp": "data", "ep": "expert", "acc": "accum"}[m.group(1)]
        return (key, value) if value >= 1 else (None, None)
    if part in _ZERO:
        return "zero", _ZERO[part]
    if m := _CKPT.match(part):
        if m.group(2) is not None:
            return ("checkpointing", f"every_k:{m.group(2)}") if int(m.group(2)) >= 1 else (None, None)
        return "checkpointing", m.group(1)
    if part in _FLAGS:
        return _FLAGS[part]
    return None, None


@dataclass
class LayoutResult:
    spec: LayoutSpec
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    error: Optional[str] = None  # the run's last error line when it failed
    refused: Optional[str] = None  # llmforge's one-line refusal of this variant (not a failure)
    precision: str = "fp32"
    tolerances: tuple[float, float] = (0.0, 0.0)
    loss_diff: float = math.nan  # max relative difference from the reference over the steps
    grad_diff: float = math.nan
    passed: bool = False
    reference: Optional[LayoutResult] = field(default=None, repr=False)  # what it was compared with


def _last_error(output: str) -> str:
    lines = [line for line in output.splitlines() if "error" in line.lower()]
    return (lines[-1] if lines else (output.strip().splitlines() or ["no output"])[-1]).strip()


def _batch_sets(spec: LayoutSpec, global_batch: int, recipe_micro: int) -> list[str]:
    """Micro-batch and accumulation of `spec` that give the fixed global batch (one-line error when none does)."""
    if spec.accum is None:
        micro, accum = recipe_micro, global_batch // (recipe_micro * spec.data)
    else:
        micro, accum = global_batch // (spec.accum * spec.data), spec.accum
    if micro < 1 or micro * accum * spec.data != global_batch:
        raise UserError(
            f"{spec.name}: no micro-batch gives the global batch of {global_batch} samples with "
            f"{spec.data} data-parallel replica(s) and {accum} accumulation steps; choose accN dividing it"
        )
    return [f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}"]


def _run_sets(spec: LayoutSpec, sets: list[str], out: str) -> list[str]:
    """The recipe overrides of `spec`'s run in <out>/parity-<name>: logged every step, no eval, no checkpoint, no
    spike guard."""
    return [
        *sets,
        f"run.output_dir={out}",
        f"run.name=parity-{spec.name}",
        f"checkpoint.dir={os.path.join(out, f'parity-{spec.name}', 'checkpoints')}",
        "checkpoint.interval=0",
        "logging.interval=1",
        "eval.interval=0",
        "train.spike_guard.enabled=false",
    ]


def _launch(ranks: int, module_args: list[str], specs: list[LayoutSpec], out: str, steps: int) -> tuple[int, str]:
    """Launch `ranks` ranks on this node and wait, showing a bar of the steps the variants' runs have logged so
    far (their metrics.jsonl, polled); (exit code, output). Output goes to a file, so no pipe fills up."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--no_local_rank", "--module"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    names = ",".join(spec.name for spec in specs) if len(specs) <= 2 else f"{len(specs)} variants"
    bar = tqdm(
        total=steps * len(specs), unit="step", desc=f"{names} ({ranks} rank{'s' * (ranks > 1)})", dynamic_ncols=True
    )
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen([*cmd, *module_args], stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        while proc.poll() is None:
            time.sleep(1.0)
            bar.update(sum(_logged_steps(os.path.join(out, f"parity-{s.name}")) for s in specs) - bar.n)
        bar.close()
        log.seek(0)
        return proc.returncode, log.read()


def _logged_steps(run_dir: str) -> int:
    """Training rows a run has written so far (a partly written last line is not counted)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]
    except OSError:
        return 0
    return sum('"loss"' in line and '"event"' not in line for line in lines)


def _read_run(spec: LayoutSpec, out: str) -> LayoutResult:
    result = LayoutResult(spec)
    run_dir = os.path.join(out, f"parity-{spec.name}")
    error_file = os.path.join(run_dir, _ERROR_FILE)
    if os.path.isfile(error_file):
        with open(error_file, encoding="utf-8") as f:
            result.error = f.read().strip() or "failed"
        return result
    for row in read_metrics(run_dir) if os.path.isdir(run_dir) else []:
        if "loss" in row and "event" not in row:
            result.losses[row["step"]] = row["loss"]
            result.grad_norms[row["step"]] = row["grad_norm"]
    return result


def run_layout(recipe: str, sets: list[str], spec: LayoutSpec, out: str, steps: int) -> LayoutResult:
    """Train `spec` with the recipe and `sets` in <out>/parity-<spec.name> (one launch); its per-step loss and
    gradient norm."""
    args = ["llmforge.cli", "pretrain", "--recipe", recipe, "--resume", "none"]
    for s in _run_sets(spec, sets, out):
        args += ["--set", s]
    code, output = _launch(spec.ranks, args, [spec], out, steps)
    if code != 0:
        result = LayoutResult(spec)
        result.error = _last_error(output)
        return result
    return _read_run(spec, out)


def run_group(recipe: str, plans: list[tuple[LayoutSpec, list[str]]], out: str, steps: int) -> list[LayoutResult]:
    """Train several variants of the same rank count one after another in one launch (the launcher and every
    import paid once): the worker below calls `run_training` for each. A variant that fails writes its error and
    the next one starts."""
    ranks = plans[0][0].ranks
    plan_path = os.path.join(out, f"plan-{ranks}-{plans[0][0].name}.json")
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump([{"name": spec.name, "sets": _run_sets(spec, sets, out)} for spec, sets in plans], f)
    specs = [spec for spec, _ in plans]
    code, output = _launch(ranks, ["llmforge.parity", "--worker", plan_path, "--recipe", recipe], specs, out, steps)
    results = [_read_run(spec, out) for spec in specs]
    for r in results:
        if code != 0 and r.error is None and not r.losses:
            r.error = _last_error(output)
    return results


_ERROR_FILE = "parity-error.txt"


def _worker(recipe: str, plan_path: str) -> None:
    """Inside a launch: train each planned variant in turn (`python -m llmforge.parity --worker PLAN --recipe R`)."""
    setup_logging()
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    for entry in plan:
        try:
            run_training(recipe, entry["sets"], "none")
        except Exception as e:  # recorded for this variant; the next one runs (every rank fails alike)
            if os.environ.get("RANK", "0") == "0":
                run_dir = next(s.split("=", 1)[1] for s in entry["sets"] if s.startswith("run.output_dir="))
                path = os.path.join(run_dir, f"parity-{entry['name']}")
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, _ERROR_FILE), "w", encoding="utf-8") as f:
                    f.write(f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__)


def _rel(a: Optional[float], b: Optional[float]) -> float:
    if a is None or b is None:
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def compare(result: LayoutResult, reference: LayoutResult, steps: int) -> None:
    """Fill in the result's largest relative differences from the reference and whether both are in tolerance."""
    if result.error is not None or reference.error is not None or result.refused is not None:
        return
    result.reference = reference
    every = range(1, steps + 1)
    result.loss_diff = max(_rel(result.losses.get(s), reference.losses.get(s)) for s in every)
    result.grad_diff = max(_rel(result.grad_norms.get(s), reference.grad_norms.get(s)) for s in every)
    result.passed = result.loss_diff <= result.tolerances[0] and result.grad_diff <= result.tolerances[1]


def _refusal(recipe_path: str, sets: list[str], spec: LayoutSpec) -> Optional[str]:
    """llmforge's one-line refusal of this variant's recipe or DeepSpeed config, found without a launch."""
    try:
        recipe = load_recipe(recipe_path, sets)
        compose_ds_config(recipe, spec.data, recipe.run_dir, recipe_path, on_cpu=not torch.cuda.is_available())
    except UserError as e:
        return str(e)
    return None


def parity(
    recipe_path: str,
    overrides: list[str],
    layouts: str,
    steps: int,
    out: Optional[str] = None,
    oracle: bool = False,
    one_launch: bool = False,
) -> list[LayoutResult]:
    """Run every variant and compare it with the reference: the first (one-rank) run, or with `oracle` the plain
    PyTorch fp32 steps of train/oracle.py. The reference is results[0]. `one_launch`: variants of the same rank
    count without tensor or sequence parallelism (whose process groups DeepSpeed keeps per process) share one
    launch."""
    specs = parse_layouts(layouts)
    if steps < 1:
        raise UserError(f"--steps {steps}: must be >= 1")
    recipe = load_recipe(recipe_path, overrides)  # a recipe error stops here, before any launch
    if not oracle:  # layouts keep the recipe's stage and precision: a refused recipe refuses them all
        compose_ds_config(recipe, 1, recipe.run_dir, recipe_path, on_cpu=not torch.cuda.is_available())
        if specs[0].ranks != 1:
            specs.insert(0, LayoutSpec("1"))
    largest = max(s.data for s in specs)
    for s in specs:
        if largest % s.data:
            raise UserError(
                f"{layouts!r}: {s.name} has {s.data} data-parallel replicas, which do not divide the largest "
                f"({largest}): the variants could not train on the same global batch"
            )
    t = recipe.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * largest
    schedule = [f"train.max_steps={steps}", f"train.warmup_steps={min(t.warmup_steps, steps)}"]
    plans = [(s, [*overrides, *schedule, *s.sets(), *_batch_sets(s, global_batch, t.micro_batch_size)]) for s in specs]
    own_dir = out is None
    out = os.path.abspath(out or tempfile.mkdtemp(prefix="llmforge-parity-"))
    os.makedirs(out, exist_ok=True)
    table = ORACLE_TOLERANCES if oracle else TOLERANCES
    # An MoE block's load-balancing loss is a statistic of each micro-batch, so the objective depends on the
    # micro-batch size: such a model gets an oracle per micro-batch size (over the same micro-batches, in the same
    # order); a dense model's loss does not, and one oracle at the recipe's micro-batch serves every variant.
    per_micro = recipe.model.moe.enabled
    micro_of = {s.name: int(_batch_sets(s, global_batch, t.micro_batch_size)[0].split("=")[1]) for s in specs}

    def oracle_key(spec: LayoutSpec) -> tuple[tuple[str, ...], int]:
        return tuple(spec.model_sets()), micro_of[spec.name] if per_micro else t.micro_batch_size

    oracle_recipes = {
        key: load_recipe(recipe_path, [*overrides, *schedule, *key[0]])
        for key in ({oracle_key(s) for s in specs} if oracle else set())
    }
    for r in oracle_recipes.values():
        check_oracle_recipe(r, recipe_path)  # before any launch
    by_name: dict[str, LayoutResult] = {}
    try:
        runnable = []
        for spec, sets in plans:
            refused = _refusal(recipe_path, sets, spec)
            if refused:
                by_name[spec.name] = LayoutResult(spec, refused=refused, precision="-")
                tqdm.write(f"{spec.name}: refused: {refused}", file=sys.stderr)
            else:
                runnable.append((spec, sets))
        shared: dict[int, list[tuple[LayoutSpec, list[str]]]] = {}
        for spec, sets in runnable:
            if one_launch and spec.layout.tensor == spec.layout.sequence == 1:
                shared.setdefault(spec.ranks, []).append((spec, sets))
            else:
                by_name[spec.name] = run_layout(recipe_path, sets, spec, out, steps)
        for group in shared.values():
            for result in run_group(recipe_path, group, out, steps):
                by_name[result.spec.name] = result
        for spec, sets in runnable:
            train = resolve_precision(load_recipe(recipe_path, sets), on_cpu=not torch.cuda.is_available())[0].train
            by_name[spec.name].precision = train.precision + ("+fp8" if train.fp8.enabled else "")
    finally:
        if own_dir:
            shutil.rmtree(out, ignore_errors=True)
    results = [by_name[spec.name] for spec in specs]
    for result in results:
        result.tolerances = table.get("fp8" if "+fp8" in result.precision else result.precision, (0.0, 0.0))
    if oracle:
        references = {}
        for key, r in sorted(oracle_recipes.items()):
            model_sets, micro = key
            notes = [*model_sets, *([f"micro-batch {micro}"] if per_micro else [])]
            tqdm.write(
                f"oracle: {steps} plain-PyTorch fp32 steps{' (' + ', '.join(notes) + ')' if notes else ''}",
                file=sys.stderr,
            )
            run = oracle_steps(r, recipe_path, steps, global_batch, micro)
            references[key] = LayoutResult(LayoutSpec("oracle"), run.losses, run.grad_norms, precision="fp32")
        for result in results:
            compare(result, references[oracle_key(result.spec)], steps)
        first = ((), t.micro_batch_size)  # the recipe's own model and micro-batch when a variant uses them
        reference = references[first] if first in references else next(iter(references.values()))
        reference.passed = True
        results.insert(0, reference)
    else:
        for result in results[1:]:
            compare(result, results[0], steps)
        results[0].passed = results[0].error is None
    if not own_dir:
        write_json(os.path.join(out, "parity.json"), results, oracle)
    return results


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1e}"


def format_report(results: list[LayoutResult], steps: int, oracle: bool = False) -> str:
    """Per-step differences from the reference, then one pass/fail line per variant."""
    ref, others = results[0], [r for r in results[1:] if r.error is None and r.refused is None]
    what = "the fp32 plain-PyTorch oracle" if oracle else "the 1-rank run"
    table = ORACLE_TOLERANCES if oracle else TOLERANCES
    bars = ", ".join(f"{p} {a:.0e}/{b:.0e}" for p, (a, b) in table.items())
    lines = [
        f"parity over {steps} steps against {what}: relative differences of loss and gradient norm; tolerances "
        f"(loss/gradient norm) {bars}",
        "",
        f"step  {'loss (' + ref.spec.name + ')':>14}  "
        + "  ".join(f"{r.spec.name + ' dloss':>14} {r.spec.name + ' dgrad':>14}" for r in others),
    ]
    if ref.error is None:
        for s in range(1, steps + 1):
            cells = "  ".join(
                f"{_fmt(_rel(r.losses.get(s), _ref_of(r, results).losses.get(s))):>14} "
                f"{_fmt(_rel(r.grad_norms.get(s), _ref_of(r, results).grad_norms.get(s))):>14}"
                for r in others
            )
            lines.append(f"{s:>4}  {ref.losses.get(s, math.nan):>14.6f}  {cells}")
    width = max(14, *(len(r.spec.name) + 2 for r in results))
    lines += ["", f"{'variant':<{width}}{'ranks':>6}  {'precision':>9}  {'max dloss':>10}  {'max dgrad':>10}  result"]
    for i, r in enumerate(results):
        status = "reference" if i == 0 and r.error is None else ("pass" if r.passed else "FAIL")
        if r.refused is not None:
            status = f"refused: {r.refused}"
        elif r.error is not None:
            status = f"FAIL: {r.error}"
        lines.append(
            f"{r.spec.name:<{width}}{r.spec.ranks:>6}  {r.precision:>9}  {_fmt(r.loss_diff):>10}  "
            f"{_fmt(r.grad_diff):>10}  {status}"
        )
    return "\n".join(lines)


def _ref_of(result: LayoutResult, results: list[LayoutResult]) -> LayoutResult:
    return result.reference or results[0]


def failed(results: list[LayoutResult]) -> bool:
    """Whether a variant failed (a refused variant is not a failure: llmforge said no in one line)."""
    return any(not r.passed and r.refused is None for r in results)


def write_json(path: str, results: list[LayoutResult], oracle: bool) -> None:
    rows = [
        {
            "variant": r.spec.name,
            "layout": r.spec.name,
            "ranks": r.spec.ranks,
            "settings": {k: v for k, v in dataclasses.asdict(r.spec).items() if k != "name"},
            "precision": r.precision,
            "tolerances": list(r.tolerances),
            "max_loss_rel_diff": None if math.isnan(r.loss_diff) else r.loss_diff,
            "max_grad_norm_rel_diff": None if math.isnan(r.grad_diff) else r.grad_diff,
            "passed": r.passed,
            "refused": r.refused,
            "error": r.error,
            "losses": r.losses,
            "grad_norms": r.grad_norms,
        }
        for r in results
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"reference": "oracle" if oracle else "1", "layouts": rows}, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="llmforge parity's worker inside a launch (see run_group)")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--recipe", required=True)
    args = parser.parse_args()
    _worker(args.recipe, args.worker)
