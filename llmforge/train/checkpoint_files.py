"""Checkpoint files on disk, on top of DeepSpeed's sharded `save_checkpoint`: atomic commit, verification, lookup.

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
from typing import Any, Optional, cast

import numpy as np
import torch
import torch.distributed as dist

from llmforge.errors import CheckpointError
from llmforge.fileio import sha256_file
from llmforge.train.distributed import barrier, rank

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


def load_rng(path: str) -> dict:
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


def read_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {STATE} ({e})") from None
