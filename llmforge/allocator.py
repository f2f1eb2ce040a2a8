"""The C memory allocator of training processes: tcmalloc where it is installed, glibc's malloc otherwise.

A CPU training step allocates and frees the same megabyte-sized activation buffers every step. glibc serves those
from fresh mmap-ed pages or trims them back to the OS, so each step pays page faults again; tcmalloc keeps them.
PyTorch's CPU tuning guide and launcher (`torch.backends.xeon.run_cpu`) preload tcmalloc or jemalloc for this
reason; llmforge does it for its training commands (pretrain, sft, dpo), measured in bench/allocator.py.

An allocator must be in place before the process starts, so the command re-executes itself once, with the library in
LD_PRELOAD, before torch is imported. `LLMFORGE_ALLOCATOR=system` keeps glibc's malloc. Imports nothing heavy.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from typing import Optional

from llmforge.errors import UserError

ENV = "LLMFORGE_ALLOCATOR"
CHOICES = ("tcmalloc", "system")
# Set unless the environment sets them: gperftools reports every allocation over 1 GiB on stderr by default, and
# large data and checkpoint buffers are normal here. (Its page release rate stays at the default: rate 0, which keeps
# freed pages, measured no clear difference; see bench/results/cpu-2026-11-22-allocator.md.)
TCMALLOC_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def requested() -> str:
    value = os.environ.get(ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if value not in CHOICES:
        raise UserError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


def find_tcmalloc() -> Optional[str]:
    """Path (or soname the dynamic loader resolves) of tcmalloc: the environment's own lib directory first (conda,
    a venv built against one), then the loader's cache (Debian/Ubuntu: libtcmalloc-minimal4 or libgoogle-perftools4).
    None where there is none or the platform has no LD_PRELOAD."""
    if not sys.platform.startswith("linux"):
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in ("libtcmalloc_minimal.so*", "libtcmalloc.so*"):
            found = sorted(glob.glob(os.path.join(prefix, "lib", name)))
            if found:
                return found[0]
    for name in ("tcmalloc_minimal", "tcmalloc"):
        soname = ctypes.util.find_library(name)
        if soname:
            return soname
    return None


def loaded() -> Optional[str]:
    """The tcmalloc library mapped into this process, or None (glibc's malloc)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if "libtcmalloc" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def reexec_with_tcmalloc() -> None:
    """Re-execute this process with tcmalloc preloaded when it is requested, installed and not loaded yet; returns
    without doing anything otherwise. Call before importing torch (threads and loaded libraries are lost on exec)."""
    if requested() != "tcmalloc" or loaded():
        return
    lib = find_tcmalloc()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload.replace(":", " ").split():
        return  # not installed, or the loader already refused it once: never loop
    env = {**TCMALLOC_ENV, **os.environ, "LD_PRELOAD": " ".join(filter(None, (lib, preload)))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def current() -> str:
    return "tcmalloc" if loaded() else "glibc malloc"


def describe() -> str:
    """One line for the run's log: which allocator this process runs on, and how to change it."""
    lib = loaded()
    if lib:
        return f"allocator: tcmalloc ({lib}); {ENV}=system for glibc's malloc"
    if requested() == "system":
        return f"allocator: glibc malloc ({ENV}=system)"
    return (
        "allocator: glibc malloc (tcmalloc not found; on Debian/Ubuntu `apt-get install libtcmalloc-minimal4` "
        "makes CPU training faster, see bench/allocator.py)"
    )
