"""A run's checkpoints as the loop sees them: `Checkpointer` (the client state every checkpoint records, save,
resume, rollback), where to resume from (`resolve_resume`, with `--resume auto` passing over damaged checkpoints),
and resuming at another world size or ZeRO stage through DeepSpeed's universal form. The files themselves — atomic
commit, manifest, verification — are llmforge/train/checkpoint_files.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from llmforge.config import Recipe, recipe_to_dict, recipe_to_yaml
from llmforge.config.parallel import Layout
from llmforge.errors import CheckpointError
from llmforge.tokenizer import Tokenizer, fingerprint
from llmforge.train.checkpoint_files import (
    STATE,
    find_checkpoint,
    load_rng,
    newest_complete,
    read_state,
    save_checkpoint,
    set_rng_state,
)
from llmforge.train.distributed import barrier, rank
from llmforge.train.guard import FaultInjector
from llmforge.train.metrics import Metrics
from llmforge.train.schedule import lr_at

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands: what a checkpoint restores besides the engine's weights and optimizer."""

    step: int = 0  # optimizer steps completed (skipped steps included)
    consumed_samples: int = 0  # global samples consumed (the data position)
    consumed_tokens: int = 0  # their non-pad input tokens
    guard: dict = field(default_factory=dict)
    source_tokens: dict = field(default_factory=dict)  # training tokens read from each dataset (data.stages)

    @classmethod
    def from_client(cls, client: dict) -> TrainState:
        return cls(
            step=client["step"],
            consumed_samples=client["consumed_samples"],
            consumed_tokens=client.get("consumed_tokens", 0),
            guard=client.get("guard", {}),
            source_tokens=client.get("source_tokens", {}),
        )


@dataclass
class ResumePoint:
    path: Optional[str]  # the checkpoint to load, or None (a fresh start)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path, problem): newer ones `auto` passed over


def resolve_resume(resume: str, ckpt_dir: str) -> ResumePoint:
    """`none` → no checkpoint; `auto` → the newest intact checkpoint in ckpt_dir (damaged newer ones are passed over
    and listed: an unattended, requeued job must not die on one bad file); a path → that checkpoint or an error.

    A path may name a checkpoint (`.../step_00000100`), a checkpoints directory, or a run directory.
    """
    if resume == "none":
        return ResumePoint(None)
    if resume == "auto":
        damaged: list[tuple[str, str]] = []
        path = newest_complete(ckpt_dir, damaged=damaged)
        if path is None and damaged:  # never a silent fresh start over damaged progress
            raise CheckpointError(f"{damaged[0][1]}; no intact older checkpoint in {ckpt_dir} to fall back to")
        return ResumePoint(path, damaged)
    return ResumePoint(find_checkpoint(resume, "--resume"))


UNIVERSAL_INFO = "universal_checkpoint_info"
UNIVERSAL = "universal"  # <checkpoint>/universal/: the DeepSpeed universal form, made when the layout changes


def universal_info() -> dict:
    """What ds_to_universal needs in the client state; pure data parallelism has no TP/PP patterns to declare."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def ensure_universal(path: str, expert: int = 1) -> str:
    """Convert the checkpoint at `path` to DeepSpeed's universal format once (rank 0; every rank waits) and return
    the directory to load from. Used to resume at another world size, ZeRO stage or expert size: `expert` names
    the routers as the resuming engine does (`fit_universal_to_experts`)."""
    out = os.path.join(path, UNIVERSAL)
    if rank() == 0:
        if not os.path.isdir(out):
            tmp = out + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_universal(path, tmp)
            os.replace(tmp, out)
        fit_universal_to_experts(out, expert)
    barrier()
    return out


def fit_universal_to_experts(universal: str, expert: int) -> None:
    """Make a universal checkpoint fit an engine with `expert` expert-parallel ranks (rank 0, before any loads it).
    - Each MoE block's router is named as that engine names it: AutoEP's replacement block keeps it as
      `moe.router.gate.weight`, the GPT's own block as `moe.gate.weight`.
    - The stacked E x ... expert weights and their moments are stored alike either way, but DeepSpeed gives each
      expert-parallel rank its experts' rows only of files marked as expert parameters, which a checkpoint saved
      without expert parallelism does not mark (every rank would load the first E/expert experts): marked here.
    - DeepSpeed pairs the engine's optimizer groups with the checkpoint's by position and stops at the shorter
      list: under AutoEP the experts are a third group (`ep_size_<E>`, after decay and no-decay), so a checkpoint
      without one would leave the experts at their initial values. It gets one (the decay group's settings: the
      experts are matrices), and an existing one is renamed for the new expert size."""
    import torch

    zero = os.path.join(universal, "zero")
    ours, autoep = ".moe.gate.weight", ".moe.router.gate.weight"
    have, want = (ours, autoep) if expert > 1 else (autoep, ours)
    for name in sorted(os.listdir(zero)):
        if name.endswith(have):
            os.replace(os.path.join(zero, name), os.path.join(zero, name[: -len(have)] + want))
        elif expert > 1 and re.search(r"\.moe\.experts\.w[123]$", name):
            for file in sorted(os.listdir(os.path.join(zero, name))):
                saved = torch.load(os.path.join(zero, name, file), weights_only=False)
                if file != "step.pt" and not saved.get("is_expert_param"):
                    saved.update(is_expert_param=True, ep_num_experts=saved["param"].shape[0])
                    _torch_save(saved, os.path.join(zero, name, file))
    state_path = os.path.join(zero, "optimizer_state.pt")
    state = torch.load(state_path, weights_only=False)
    groups = [g for g in state["param_groups"] if not g.get("moe")]
    if expert > 1:
        decay = next(g for g in groups if g.get("name") == "decay")
        groups.append({**decay, "name": f"ep_size_{expert}", "moe": True})
    if groups != state["param_groups"]:
        state["param_groups"] = groups
        _torch_save(state, state_path)


def _torch_save(obj: Any, path: str) -> None:
    import torch

    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def convert_to_universal(path: str, out: str) -> None:
    """DeepSpeed's ds_to_universal from the checkpoint at `path` into the new directory `out` (one parameter per
    directory, fp32 and optimizer moments; an AutoEP block's experts consolidated), one line when it fails."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path, "--output_folder", out]
    done = subprocess.run(
        [*cmd, "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"{path}: conversion to a universal checkpoint failed: {tail[0]}")


def load_checkpoint(engine: Any, path: str) -> dict:
    """Load DeepSpeed state and this rank's RNG from a verified checkpoint; returns the client state."""
    load_dir, tag = os.path.split(path.rstrip("/"))
    loaded, client_state = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:  # DeepSpeed returns (None, None) instead of raising when it finds nothing
        raise CheckpointError(f"{path}: DeepSpeed found no loadable checkpoint there")
    source = os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == UNIVERSAL else path
    rng_path = os.path.join(source, f"rng_rank{rank():05d}.pt")
    if os.path.isfile(rng_path):  # after a world-size change, new ranks start with their seeded RNG
        set_rng_state(load_rng(rng_path))
    return client_state or {}


def check_resume(
    point: ResumePoint,
    tok_fp: str,
    data_fp: Optional[str],
    allow_data_change: bool,
    layout: Layout,
    stage: int,
    data_order: Optional[Callable[[int], list]] = None,
) -> bool:
    """Refuse a checkpoint trained with another tokenizer or (unless allowed) other data; True when it was saved at
    another world size or ZeRO stage, so it must be loaded through DeepSpeed's universal form. Before the engine.
    `data_order(n)`: what decides the recipe's first n training samples (StagePlan.describe); where the checkpoint
    recorded its own, the data check compares those (datasets may be added and later stages changed, as extending
    a run with an anneal stage does) instead of the fingerprint of every dataset."""
    if point.path is None:
        return False
    saved = read_state(point.path)
    if saved.get("tokenizer_fingerprint") not in (None, tok_fp):
        raise CheckpointError(
            f"{point.path} was trained with tokenizer {saved['tokenizer_fingerprint']}, the recipe's is {tok_fp}"
        )
    if data_order is not None and "data_order" in saved:
        _check_order(saved, point.path, data_order(saved["consumed_samples"]), allow_data_change)
    else:
        _check_data(saved, point.path, data_fp, allow_data_change)
    return _needs_universal(saved, point.path, layout, stage)


def _order_text(order: list) -> str:
    return "; ".join(
        f"from sample {s['first_sample']}: " + ", ".join(f"{d[1]} {d[2]:.3g}" for d in s["datasets"]) for s in order
    )


def _check_order(saved: dict, path: str, mine: list, allow_change: bool) -> None:
    """The recipe must read the checkpoint's consumed samples as the checkpoint's run did: the same stages (first
    sample, weights, datasets and their content) up to that sample."""
    consumed = saved["consumed_samples"]
    theirs = [s for s in saved["data_order"] if s["first_sample"] < consumed]
    if json.loads(json.dumps(mine)) == theirs:
        return
    if not allow_change:
        raise CheckpointError(
            f"{path} read its first {consumed} samples as [{_order_text(theirs)}]; the recipe's datasets and "
            f"data.stages read them as [{_order_text(mine)}]: keep the stages already run as they were (change "
            "later stages only), or pass --set data.allow_fingerprint_change=true to go on from the same sample "
            "counter"
        )
    log.warning(
        "the data order of %s's first %d samples changed; continuing from the same sample counter as asked",
        path,
        consumed,
    )


def _needs_universal(saved: dict, path: str, layout: Layout, stage: int) -> bool:
    """True when the checkpoint was saved at another world size, ZeRO stage or expert size: DeepSpeed's sharded
    files do not fit, so it is loaded through a universal checkpoint (the experts regrouped by
    `fit_universal_to_experts`). Moves DeepSpeed's universal loader cannot make are refused.
    The sequence size may change freely: sequence ranks hold whole weights, and ZeRO shards over world ÷ tensor."""
    before = Layout.from_identity(saved, layout)
    world, tensor, expert = layout.world, layout.tensor, layout.expert
    before_world, before_stage, before_tensor = before.world, saved.get("zero_stage", stage), before.tensor
    if before_tensor != tensor:
        raise CheckpointError(
            f"{path} was saved with parallel.tensor={before_tensor}; resuming it under tensor={tensor} is not "
            f"supported (its layers are stored as {before_tensor} shards): resume with parallel.tensor: "
            f"{before_tensor}, or export it (export_hf.py) and start from the export"
        )
    if (before_world, before_stage, before.expert) == (world, stage, expert):
        return False
    if 3 in (before_stage, stage) and max(before.expert, expert) > 1:
        raise CheckpointError(
            f"{path} was saved on {before_world} ranks under ZeRO-{before_stage} with parallel.expert="
            f"{before.expert}; DeepSpeed's universal loader does not regroup experts under ZeRO-3, so it resumes "
            f"only as saved ({world} ranks, ZeRO-{stage}, expert={expert} asked): resume as saved, or under ZeRO-1 "
            "or 2 on both sides, where any world and expert size works"
        )
    if tensor > 1:
        raise CheckpointError(
            f"{path} was saved on {before_world} ranks under ZeRO-{before_stage}; a tensor-parallel run resumes "
            f"only on the same number of ranks and ZeRO stage ({world} ranks, ZeRO-{stage} asked)"
        )
    if (before_stage == 3) != (stage == 3):
        raise CheckpointError(
            f"{path} was saved under ZeRO-{before_stage}; DeepSpeed's universal loader cannot move "
            f"it to ZeRO-{stage} (stage 3 <-> 0/1/2). Resume under "
            f"{'ZeRO-3' if before_stage == 3 else 'ZeRO-1 or 2'}: any world or expert size works there"
        )
    return True


def _check_data(client: dict, path: str, data_fp: Optional[str], allow_data_change: bool) -> None:
    if client.get("data_fingerprint") not in (None, data_fp):
        if not allow_data_change:
            raise CheckpointError(
                f"{path} was trained on data {client['data_fingerprint']}, "
                f"the recipe's is {data_fp}; "
                f"to continue on the new data pass --set data.allow_fingerprint_change=true"
            )
        log.warning(
            "datasets changed since %s (%s -> %s); continuing from the same sample counter as asked",
            path,
            client["data_fingerprint"],
            data_fp,
        )


@dataclass
class RunIdentity:
    """What every checkpoint of a run records besides its step: how to rebuild the model and check a resume."""

    recipe: Recipe
    tokenizer: Tokenizer
    data_fingerprint: Optional[str]
    layout: Layout
    zero_stage: int
    extra: dict = field(default_factory=dict)  # e.g. imported_from
    lr_decay: Optional[tuple[int, int]] = None  # the data stage the LR decays over (StagePlan.decay_window)


def _set_aside(path: str) -> str:
    """Rename a damaged checkpoint out of the run's step sequence (rank 0; every rank waits), so that training on
    past its step does not overwrite it: it stays for inspection. Returns the new name."""
    target = f"{path}.damaged"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged{n}"
    if rank() == 0:
        os.replace(path, target)
    barrier()
    return target


class Checkpointer:
    """Owns a run's checkpoints: the client state written with every save, resume and rollback.

    `save()` commits a checkpoint (manifest + pointer: checkpoint_files.py) with the recipe, tokenizer and
    fingerprints beside DeepSpeed's shards; `resume()` loads one into the engine and returns where training stands;
    `rollback()` goes back to the newest complete one after a persistent divergence.
    """

    def __init__(
        self,
        ckpt_dir: str,
        keep_last: int,
        identity: RunIdentity,
        metrics: Optional[Metrics] = None,
        faults: Optional[FaultInjector] = None,
    ):
        self.ckpt_dir, self.keep_last, self.identity = ckpt_dir, keep_last, identity
        self.metrics, self.faults = metrics, faults or FaultInjector("")
        recipe, tok = identity.recipe, identity.tokenizer
        self._recipe_dict, self._recipe_yaml = recipe_to_dict(recipe), recipe_to_yaml(recipe)
        self._tokenizer_json = json.dumps(tok.to_json(), ensure_ascii=False)
        self._tokenizer_fp = fingerprint(tok)

    def client_state(self, state: TrainState) -> dict:
        """The fields written to llmforge_state.json (readable without loading a shard); the recipe travels in
        DeepSpeed's client state too."""
        ident = self.identity
        return {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_tokens,
            "guard": state.guard,
            "source_tokens": state.source_tokens,
            **ident.layout.identity(),
            "zero_stage": ident.zero_stage,
            "global_batch": ident.recipe.train.global_batch(ident.layout.data),
            "micro_batch_size": ident.recipe.train.micro_batch_size,
            "grad_accum_steps": ident.recipe.train.grad_accum_steps,
            "max_steps": ident.recipe.train.max_steps,
            "tokenizer_fingerprint": self._tokenizer_fp,
            "data_fingerprint": ident.data_fingerprint,
            UNIVERSAL_INFO: universal_info(),
            **ident.extra,
        }

    def save(self, engine: Any, state: TrainState) -> Optional[str]:
        """Commit a checkpoint of `state` (every rank calls it). None when the disk could not hold it."""
        started = time.time()
        client = self.client_state(state)
        if getattr(engine, "has_moe_layers", False):
            # DeepSpeed's MoE save path writes this key itself and refuses it in the client state
            client.pop(UNIVERSAL_INFO, None)
        files = {
            "tokenizer.json": self._tokenizer_json,
            STATE: json.dumps(client, indent=1),
            "recipe.yaml": self._recipe_yaml,
        }
        path = save_checkpoint(
            engine,
            self.ckpt_dir,
            state.step,
            {**client, "recipe": self._recipe_dict},
            self.keep_last,
            fault=self.faults.save_fault(state.step),
            extra_files=files,
        )
        if path is None:
            log.warning("checkpoint at step %d skipped: not enough disk space; the previous one is intact", state.step)
            self._event("checkpoint_skipped", step=state.step, reason="disk space")
        else:
            self._event("checkpoint", step=state.step, path=path, save_s=round(time.time() - started, 3))
        return path

    def resume(self, engine: Any, point: ResumePoint, universal: bool) -> TrainState:
        """Load `point` into the engine (through DeepSpeed's universal form when the layout changed); a fresh
        TrainState when there is nothing to resume."""
        for path, problem in point.damaged:
            kept = _set_aside(path)
            self._event("resume_fallback", damaged=problem, moved_to=kept, checkpoint=point.path)
        if point.path is None:
            return TrainState()
        started = time.time()
        state = TrainState.from_client(
            load_checkpoint(
                engine, ensure_universal(point.path, self.identity.layout.expert) if universal else point.path
            )
        )
        saved = read_state(point.path)
        if universal:
            self._event(
                "elastic_resume",
                from_world=saved.get("world_size"),
                to_world=self.identity.layout.world,
                from_stage=saved.get("zero_stage"),
                to_stage=self.identity.zero_stage,
            )
        changed = self._changes(saved)
        t = self.identity.recipe.train
        if "max_steps" in changed:  # the LR schedule is a function of max_steps: it is re-derived over the new length
            before = lr_at(state.step, dataclasses.replace(t, max_steps=saved["max_steps"]))
            after = lr_at(state.step, t, self.identity.lr_decay)
            self._event("schedule_changed", step=state.step, max_steps=changed["max_steps"], lr=[before, after])
            log.warning(
                "train.max_steps %d -> %d: the LR schedule is re-derived; lr at step %d: %.3g -> %.3g",
                saved["max_steps"],
                t.max_steps,
                state.step,
                before,
                after,
            )
        if changed:
            log.info(
                "resumed at step %d with %s", state.step, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            )
        self._event(
            "resumed",
            step=state.step,
            checkpoint=point.path,
            resume_s=round(time.time() - started, 3),
            changed=changed,
        )
        return state

    def _changes(self, saved: dict) -> dict:
        """{quantity: [checkpoint's, now]} for what differs from the checkpoint: world size, tensor and sequence
        parallel sizes, micro-batch, accumulation, global batch, max_steps (those the checkpoint recorded)."""
        now = self.client_state(TrainState())
        keys = (
            "world_size",
            "tensor_parallel",
            "sequence_parallel",
            "expert_parallel",
            "micro_batch_size",
            "grad_accum_steps",
            "global_batch",
            "max_steps",
        )
        return {k: [saved[k], now[k]] for k in keys if saved.get(k) is not None and saved[k] != now[k]}

    def rollback(self, engine: Any) -> Optional[TrainState]:
        """Reload the newest complete checkpoint; None when there is none."""
        path = newest_complete(self.ckpt_dir)
        return None if path is None else TrainState.from_client(load_checkpoint(engine, path))

    def _event(self, name: str, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.event(name, **fields)
