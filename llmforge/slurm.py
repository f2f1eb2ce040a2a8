"""Slurm submission: render the pre-training batch script (every value shell-quoted) and call sbatch."""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shlex
import subprocess
import sys
from typing import Optional

from llmforge.config import load_recipe
from llmforge.config.deepspeed import compose_ds_config, zero_stage
from llmforge.config.parallel import check_layout, make_layout
from llmforge.errors import UserError, exit_on_user_error

# Shipped as package data (setup.cfg), so a wheel install finds it too.
TEMPLATE = importlib.resources.files("llmforge") / "templates" / "pretrain.sbatch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit.py", description=__doc__)
    p.add_argument("--recipe", required=True, help="YAML recipe")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override passed to every (re)start, repeatable",
    )
    p.add_argument("--tensor", type=int, default=None, help="parallel.tensor (default: the recipe's)")
    p.add_argument("--sequence", type=int, default=None, help="parallel.sequence (default: the recipe's)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (GPUs; CPU ranks when 0 GPUs)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks: do not request GPUs")
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 with GPUs, 1 on CPU")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name", default=None, help="default: llmforge-<recipe name>")
    p.add_argument("--grace", type=int, default=300, help="seconds of warning before the time limit (USR1)")
    p.add_argument("--output", default="slurm-%x-%j.out", help="log file (appended across requeues)")
    p.add_argument("--python", default=sys.executable, help="interpreter with llmforge installed")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.add_argument("sbatch_args", nargs="*", help="after --: extra sbatch arguments")
    return p


def render(args: argparse.Namespace, workdir: str) -> str:
    for name in ("nodes", "gpus_per_node", "grace"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not os.path.isfile(args.recipe):
        raise UserError(f"--recipe {args.recipe}: file not found")
    overrides = list(args.overrides)
    for key in ("tensor", "sequence"):
        if getattr(args, key) is not None:
            overrides.append(f"parallel.{key}={getattr(args, key)}")
    check_job_layout(args.recipe, overrides, args.nodes, args.gpus_per_node)
    q = shlex.quote
    directives = []
    if not args.cpu:
        directives.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    for flag in ("partition", "time", "account"):
        value = getattr(args, flag)
        if value:
            directives.append(f"#SBATCH --{flag}={q(value)}")
    name = args.job_name or "llmforge-" + os.path.splitext(os.path.basename(args.recipe))[0]
    with TEMPLATE.open(encoding="utf-8") as f:
        template = f.read()
    return template.format(
        job_name=q(name),
        nodes=args.nodes,
        tasks_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task or (1 if args.cpu else 8),
        grace=args.grace,
        output=q(args.output),
        extra_directives="\n".join(directives),
        workdir=q(workdir),
        python=q(args.python),
        recipe=q(args.recipe),
        overrides=" ".join(f"--set {q(o)}" for o in overrides),
    )


def check_job_layout(recipe_path: str, overrides: list[str], nodes: int, per_node: int) -> None:
    """The recipe's parallel layout on nodes x per_node ranks, checked before submitting (a recipe error is one
    line, exit 2): tensor groups must fit inside a node, which the script's block distribution fills first."""
    recipe = load_recipe(recipe_path, overrides)
    world = nodes * per_node
    layout = make_layout(recipe, world, 0, recipe_path)
    ds = compose_ds_config(recipe, layout.data, recipe.run_dir, recipe_path, False)
    check_layout(recipe, world, zero_stage(ds), recipe_path, per_node)


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    script = render(args, os.getcwd())
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    try:
        done = subprocess.run(["sbatch", "--parsable", *args.sbatch_args], input=script, text=True, capture_output=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: run this on a slurm login node (or use --dry-run)") from None
    if done.returncode != 0:
        raise UserError(f"sbatch failed: {done.stderr.strip()}")
    print(f"submitted job {done.stdout.strip()}")
    return 0
