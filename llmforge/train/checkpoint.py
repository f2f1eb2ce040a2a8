"""Checkpoint commit and resume on top of DeepSpeed's sharded `save_checkpoint` / `load_checkpoint`.

A checkpoint `<dir>/<tag>/` is complete only when `manifest.json` exists (written last, after every rank finished,
listing each file's size and sha256). `<dir>/latest` is llmforge's pointer, replaced by atomic rename after the
commit. DeepSpeed's own `latest` is never written (save_latest=False) and never trusted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import numpy as np
import torch
import torch.distributed as dist

from llmforge.config import Recipe, recipe_to_dict, recipe_to_yaml
from llmforge.errors import CheckpointError
from llmforge.fileio import sha256_file
from llmforge.tokenizer import Tokenizer, fingerprint
from llmforge.train.distributed import barrier, rank
from llmforge.train.guard import FaultInjector
from llmforge.train.metrics import Metrics

log = logging.getLogger(__name__)
CHECKPOINT_MANIFEST = "manifest.json"
POINTER = "latest"
STATE = "llmforge_state.json"  # step, data position, fingerprints: readable without loading any shard
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class TrainState:
    """Where training stands: what a checkpoint restores besides the engine's weights and optimizer."""

    step: int = 0  # optimizer steps completed (skipped steps included)
    consumed_samples: int = 0  # global samples consumed (the data position)
    consumed_tokens: int = 0  # their non-pad input tokens
    guard: dict = field(default_factory=dict)

    @classmethod
    def from_client(cls, client: dict) -> TrainState:
        return cls(
            step=client["step"],
            consumed_samples=client["consumed_samples"],
            consumed_tokens=client.get("consumed_tokens", 0),
            guard=client.get("guard", {}),
        )


def rng_state() -> dict:
    """This process's RNG states in types `torch.load(weights_only=True)` reads (no pickled numpy objects)."""
    kind, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state(legacy=True))
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng(path: str) -> dict:
    """An rng_rank*.pt file without unpickling code: plain types only, plus the numpy array and dtype classes that
    checkpoints written before this format hold."""
    ndarray_types = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct]  # type: ignore[attr-defined]
    with torch.serialization.safe_globals(ndarray_types):
        return torch.load(path, weights_only=True)


def load_model_states(path: str) -> dict:
    """DeepSpeed's `mp_rank_*_model_states.pt` (module weights, client state, ds_config) read with
    `weights_only=True`: tensors and plain containers only, so a checkpoint from elsewhere cannot run code through
    this load. (DeepSpeed's own `engine.load_checkpoint` still unpickles its files in full: resume only from
    checkpoints you trust.)"""
    return torch.load(path, map_location="cpu", weights_only=True)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _enough_space(ckpt_dir: str) -> Optional[str]:
    """None if the disk can hold another checkpoint as large as the newest one (+10%), else the problem."""
    newest = newest_complete(ckpt_dir, checksums=False)
    if newest is None:
        return None
    with open(os.path.join(newest, CHECKPOINT_MANIFEST), encoding="utf-8") as f:
        need = int(1.1 * sum(meta["size"] for meta in json.load(f)["files"].values()))
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        return f"{free / 1e6:.1f} MB free in {ckpt_dir}, a checkpoint needs about {need / 1e6:.1f} MB"
    return None


def save_checkpoint(
    engine: Any,
    ckpt_dir: str,
    step: int,
    client_state: dict,
    keep_last: int,
    extra_files: Optional[dict[str, str]] = None,
    fault: Optional[str] = None,
) -> Optional[str]:
    """Save through DeepSpeed on every rank, then commit (manifest + pointer) on rank 0. Returns the path, or None
    when the disk cannot hold the checkpoint (decided before writing anything; the previous one stays).

    A write that fails anyway (ENOSPC from a racing writer, a dying disk) raises CheckpointError on that rank, which
    ends the run: the previous checkpoint is untouched because nothing is committed before every rank finished.
    """
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    os.makedirs(ckpt_dir, exist_ok=True)
    problem = _enough_space(ckpt_dir) if rank() == 0 else None
    if _any_rank(problem is not None):
        return None
    if rank() == 0 and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover from a run killed while saving this step
    barrier()
    previous = newest_complete(ckpt_dir, checksums=False)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
        _inject(fault)
        rng_path = os.path.join(path, f"rng_rank{rank():05d}.pt")
        torch.save(rng_state(), rng_path + ".tmp")
        os.replace(rng_path + ".tmp", rng_path)
        barrier()  # every rank's shards are on disk
        if rank() == 0:
            for name, text in (extra_files or {}).items():
                _write_atomic(os.path.join(path, name), text)
            files = {}
            for root, _, names in os.walk(path):
                for name in sorted(names):
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, path)
                    files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
            manifest = {"step": step, "tag": tag, "files": files}
            _write_atomic(os.path.join(path, CHECKPOINT_MANIFEST), json.dumps(manifest, indent=1))
            _write_atomic(os.path.join(ckpt_dir, POINTER), tag + "\n")
            _prune(ckpt_dir, keep_last, step)
    except OSError as e:
        kept = os.path.basename(previous) if previous else "none"
        err = CheckpointError(
            f"saving {tag} failed on rank {rank()}: {e.strerror or e}; nothing of it was "
            f"committed, the last complete checkpoint ({kept}) is intact"
        )
        err.every_rank = True
        raise err from None
    barrier()
    return path


def _any_rank(flag: bool) -> bool:
    """A tiny control signal: True on every rank if it is True on any."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _inject(fault: Optional[str]) -> None:
    """Test hook for checkpoint faults on the last rank: 'die' (process killed mid-save) or 'enospc'."""
    if not fault or rank() != (dist.get_world_size() - 1 if dist.is_initialized() else 0):
        return
    if fault == "die":
        os._exit(137)
    if fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _steps_in(ckpt_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def _prune(ckpt_dir: str, keep_last: int, current: int) -> None:
    steps = _steps_in(ckpt_dir)
    complete = [(s, t) for s, t in steps if os.path.isfile(os.path.join(ckpt_dir, t, CHECKPOINT_MANIFEST))]
    keep = {t for _, t in complete[-keep_last:]}
    for s, t in _steps_in(ckpt_dir):
        if t not in keep and s <= current:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None if the checkpoint at `path` is complete and its files match the manifest (sizes, and sha256 when
    `checksums`), else the problem, naming the file."""
    manifest_path = os.path.join(path, CHECKPOINT_MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"{path} is incomplete (no {CHECKPOINT_MANIFEST}: the save did not finish)"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    for rel, meta in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        if os.path.getsize(full) != meta["size"]:
            return f"{full} has {os.path.getsize(full)} bytes, the manifest says {meta['size']}"
    if checksums:
        for rel, meta in manifest["files"].items():
            full = os.path.join(path, rel)
            if sha256_file(full) != meta["sha256"]:
                return f"{full} is corrupted (sha256 differs from the manifest)"
    return None


def newest_complete(
    ckpt_dir: str, checksums: bool = True, damaged: Optional[list[tuple[str, str]]] = None
) -> Optional[str]:
    """The newest committed checkpoint, verified; None if there is none.

    Uncommitted ones (no manifest: killed while saving) are passed over. A committed checkpoint whose files no
    longer match its manifest is an error naming the file, not a silent fall-back to older weights — unless a
    `damaged` list is given: then each damaged checkpoint's (path, problem) is appended to it and older ones are
    looked at.
    """
    for _, tag in reversed(_steps_in(ckpt_dir)):
        path = os.path.join(ckpt_dir, tag)
        if not os.path.isfile(os.path.join(path, CHECKPOINT_MANIFEST)):
            log.warning("%s was never committed (killed while saving?); looking at older checkpoints", path)
            continue
        problem = verify(path, checksums)
        if problem and damaged is None:
            raise CheckpointError(f"{problem}; delete {path} to resume from an older checkpoint")
        if problem:
            log.warning("%s; looking at older checkpoints", problem)
            damaged.append((path, problem))
            continue
        return path
    return None


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


def find_checkpoint(arg: str, flag: str) -> str:
    """The checkpoint a path names: a checkpoint (`.../step_00000100`, verified), or the newest complete one of a
    checkpoints directory or run directory. `flag` is the option the path came from, for the error."""
    path = arg.rstrip("/")
    if not os.path.exists(path):
        raise CheckpointError(f"{flag} {arg}: no such checkpoint")
    if os.path.isfile(os.path.join(path, CHECKPOINT_MANIFEST)) or TAG_RE.match(os.path.basename(path)):
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{flag} {arg}: {problem}")
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(candidate) and _steps_in(candidate):
            found = newest_complete(candidate)
            if found is None:
                raise CheckpointError(f"{flag} {arg}: no complete checkpoint in {candidate}")
            return found
    raise CheckpointError(f"{flag} {arg}: not a checkpoint, checkpoints directory or run directory")


UNIVERSAL_INFO = "universal_checkpoint_info"
UNIVERSAL = "universal"  # <checkpoint>/universal/: the DeepSpeed universal form, made when the layout changes


def universal_info() -> dict:
    """What ds_to_universal needs in the client state; pure data parallelism has no TP/PP patterns to declare."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def ensure_universal(path: str) -> str:
    """Convert the checkpoint at `path` to DeepSpeed's universal format once (rank 0; every rank waits) and return
    the directory to load from. Used to resume at another world size or ZeRO stage."""
    out = os.path.join(path, UNIVERSAL)
    if rank() == 0 and not os.path.isdir(out):
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            path,
            "--output_folder",
            tmp,
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CheckpointError(f"{path}: conversion to a universal checkpoint failed: {tail[0]}")
        os.replace(tmp, out)
    barrier()
    return out


def read_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {STATE} ({e})") from None


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
        set_rng_state(_load_rng(rng_path))
    return client_state or {}


def check_resume(
    point: ResumePoint, tok_fp: str, data_fp: Optional[str], allow_data_change: bool, world: int, stage: int
) -> bool:
    """Refuse a checkpoint trained with another tokenizer or (unless allowed) other data; True when it was saved at
    another world size or ZeRO stage, so it must be loaded through DeepSpeed's universal form. Before the engine."""
    if point.path is None:
        return False
    saved = read_state(point.path)
    _check_compatible(saved, point.path, tok_fp, data_fp, allow_data_change)
    return _needs_universal(saved, point.path, world, stage)


def _needs_universal(saved: dict, path: str, world: int, stage: int) -> bool:
    """True when the checkpoint was saved at another world size or ZeRO stage: DeepSpeed's sharded files do not fit,
    so it is loaded through a universal checkpoint. Moves DeepSpeed's universal loader cannot make are refused."""
    before_world, before_stage = saved.get("world_size", world), saved.get("zero_stage", stage)
    if before_world == world and before_stage == stage:
        return False
    if (before_stage == 3) != (stage == 3):
        raise CheckpointError(
            f"{path} was saved under ZeRO-{before_stage}; DeepSpeed's universal loader cannot move "
            f"it to ZeRO-{stage} (stage 3 <-> 0/1/2). Resume under "
            f"{'ZeRO-3' if before_stage == 3 else 'ZeRO-1 or 2'}: any world size works there"
        )
    return True


def _check_compatible(client: dict, path: str, tok_fp: str, data_fp: Optional[str], allow_data_change: bool) -> None:
    if client.get("tokenizer_fingerprint") not in (None, tok_fp):
        raise CheckpointError(
            f"{path} was trained with tokenizer {client['tokenizer_fingerprint']}, the recipe's is {tok_fp}"
        )
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
    world_size: int
    zero_stage: int
    extra: dict = field(default_factory=dict)  # e.g. imported_from


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

    `save()` commits a checkpoint (manifest + pointer, see the module docstring) with the recipe, tokenizer and
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
            "world_size": ident.world_size,
            "zero_stage": ident.zero_stage,
            "global_batch": ident.recipe.train.global_batch(ident.world_size),
            "tokenizer_fingerprint": self._tokenizer_fp,
            "data_fingerprint": ident.data_fingerprint,
            UNIVERSAL_INFO: universal_info(),
            **ident.extra,
        }

    def save(self, engine: Any, state: TrainState) -> Optional[str]:
        """Commit a checkpoint of `state` (every rank calls it). None when the disk could not hold it."""
        started = time.time()
        client = self.client_state(state)
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
            load_checkpoint(engine, ensure_universal(point.path) if universal else point.path)
        )
        if universal:
            saved = read_state(point.path)
            self._event(
                "elastic_resume",
                from_world=saved.get("world_size"),
                to_world=self.identity.world_size,
                from_stage=saved.get("zero_stage"),
                to_stage=self.identity.zero_stage,
            )
        self._event("resumed", step=state.step, checkpoint=point.path, resume_s=round(time.time() - started, 3))
        return state

    def rollback(self, engine: Any) -> Optional[TrainState]:
        """Reload the newest complete checkpoint; None when there is none."""
        path = newest_complete(self.ckpt_dir)
        return None if path is None else TrainState.from_client(load_checkpoint(engine, path))

    def _event(self, name: str, **fields: Any) -> None:
        if self.metrics is not None:
            self.metrics.event(name, **fields)
