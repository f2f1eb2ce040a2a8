"""Process-group setup for every way a run is launched: deepspeed, torchrun, srun, or plain python."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import sys
import time

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* when no launcher did: from SLURM_* under srun, else one process."""
    env = os.environ
    # DeepSpeed JIT-builds a CPU comm op into torch's extension cache, which is shared by every environment of the
    # user and rebuilt (under a lock) whenever another venv used it last: keep one cache per environment.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # ...and one ninja: torch builds with whichever `ninja` PATH finds first, and ninja versions hash build commands
    # differently (1.11 vs 1.13), so a process that finds the system's and one that finds the environment's (a
    # launcher run from the venv's bin/, a forked test rank from a bare `python`) rebuild the op in turn: ~20 s at
    # every switch. The environment's own ninja (the `ninja` wheel DeepSpeed installs) goes first when there is one.
    bindir = os.path.dirname(sys.executable)
    if os.access(os.path.join(bindir, "ninja"), os.X_OK):
        path = env.get("PATH", "").split(os.pathsep)
        if not path or path[0] != bindir:
            env["PATH"] = os.pathsep.join([bindir, *(p for p in path if p and p != bindir)])
    if "RANK" in env and "WORLD_SIZE" in env:
        return
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():  # what the layout check calls ranks per node
            env.setdefault("LOCAL_WORLD_SIZE", env["SLURM_NTASKS_PER_NODE"])
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            env["MASTER_ADDR"] = _first_host(nodes)
        env.setdefault("MASTER_PORT", "29500")
        return
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def port_in_use() -> str:
    """A one-line problem when this rank hosts the rendezvous store (rank 0 of a multi-rank run not under torchrun,
    whose agent holds the port itself) and MASTER_PORT is taken, by another job say; else "". Checked before
    torch.distributed starts, which would otherwise wait minutes and then fail with a traceback (EADDRINUSE)."""
    env = os.environ
    if env.get("RANK") != "0" or env.get("WORLD_SIZE", "1") == "1" or env.get("TORCHELASTIC_RUN_ID"):
        return ""
    if dist.is_available() and dist.is_initialized():  # a later run in the same process: the store is ours
        return ""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds: a closing socket is no problem
        try:
            s.bind(("", int(env.get("MASTER_PORT", "29500"))))
        except OSError:
            return port_in_use_line()
    return ""


def port_in_use_line() -> str:
    port = os.environ.get("MASTER_PORT", "29500")
    return (
        f"port {port} (MASTER_PORT) is in use on this node, by another job?: choose a free one with the launcher's "
        f"--master_port N (deepspeed), --master-port N (torchrun) or MASTER_PORT"
    )


def _first_host(nodelist: str) -> str:
    """First host of a slurm node list like 'node[01-04,07],gpu3'."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("-")[0].split(",")[0].rstrip("]")
        return prefix + first
    return head


def stale_build_locks(max_age_s: float = 600.0) -> list[str]:
    """Build locks in the extension cache older than `max_age_s`. torch's JIT build (DeepSpeed's CPU ops) holds
    `<cache>/<op>/lock` while it compiles and every other process waits on it, without a timeout; a build killed
    mid-way leaves the file behind and every later run that loads the op waits forever, at ~2% CPU. No build here
    takes minutes, so an old lock is almost certainly such a leftover."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    now = time.time()
    return [
        p for p in sorted(glob.glob(os.path.join(root, "*", "lock"))) if root and now - os.path.getmtime(p) > max_age_s
    ]


def release_shm_segment() -> None:
    """Unlink this rank's shared-memory allreduce buffer once every rank has mapped it.

    DeepSpeed's CPU comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (~67 MB) and never
    unlinks it, so every CPU run otherwise leaves 67 MB per rank in /dev/shm until the machine runs out of memory.
    The mappings stay valid after the unlink, so the name can go right after initialisation: nothing is left behind
    even when the process is killed.
    """
    if not dist.is_initialized():
        return
    dist.barrier()  # every rank has opened every peer's buffer
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    with contextlib.suppress(FileNotFoundError):  # not a CPU run, or no shm op
        os.unlink(name)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
