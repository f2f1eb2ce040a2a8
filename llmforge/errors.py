"""Errors a user can cause, and how they end a command: one line, exit code 2."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """An error the user can fix (bad recipe, data, checkpoint or CLI input). Printed as one line."""

    prefix = "error"
    every_rank = False  # printed by every rank, not only rank 0 (the failure is local to each)

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())

    def line(self) -> str:
        return f"{self.prefix}: {self}"


# Which file declared each key of a loaded recipe, per recipe path (filled by config/loader.py): a RecipeError about
# a key names the file that declared it (a parent recipe, or `--set`), not the child it was loaded through.
DECLARED: dict[str, dict[str, str]] = {}


def declared_in(file: str, key: str) -> str:
    """The file (or `--set`) that declared `key` of the recipe loaded from `file`; `file` itself when unknown."""
    origins = DECLARED.get(file)
    if not origins or not key:
        return file
    parts = re.sub(r"\[[^\]]*\]", "", key).split(".")
    for n in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:n]))
        if found:
            return found
    return file


class RecipeError(UserError):
    """A recipe problem: `recipe error: <file>: <key>: <problem>`, the file being the one that declared the key."""

    prefix = "recipe error"

    def __init__(self, file: str, key: str, problem: str):
        file = declared_in(file, key)
        self.file, self.key, self.problem = file, key, problem
        parts = [p for p in (file, key, problem) if p]
        super().__init__(": ".join(parts))


class DataError(UserError):
    prefix = "data error"


class CorruptSampleError(DataError):
    """A training sample read from a corrupt shard; the rank that read it names the shard and document. Every rank
    raises it at the same step (the step's all-reduce tells them), so they meet at a barrier before exiting: a
    launcher that kills the others at the first exit would cut their lines."""

    every_rank = True
    synchronized = True


class CheckpointError(UserError):
    prefix = "checkpoint error"


def exit_process(code: int, synchronize: bool = False) -> NoReturn:
    """End the command with `code`. A process that joined a torch.distributed group leaves without interpreter
    finalisation: gloo's worker threads can still be releasing the last collective's tensors then, which needs the
    GIL, and the process aborts ("terminate called without an active exception", exit 250 instead of `code`).
    Everything a run writes is closed by then; only the standard streams and log handlers are flushed here.

    synchronize: every rank is ending the same way (a finished or preempted run): meet at a barrier first, so the
    ranks exit together; a launcher that kills the others on a non-zero exit (srun --kill-on-bad-exit, the DeepSpeed
    launcher) then finds them already gone.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if synchronize:
            dist.barrier()
        os._exit(code)
    sys.exit(code)


def exit_on_user_error(fn: F) -> F:
    """Decorate a command's main(): a UserError prints one line on stderr and exits 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # Under a multi-rank launcher every rank hits the same error; let rank 0 speak, unless the error is
            # one rank's own (a failed write).
            if os.environ.get("RANK", "0") == "0" or getattr(e, "every_rank", False):
                print(e.line(), file=sys.stderr, flush=True)
            exit_process(2, synchronize=getattr(e, "synchronized", False))

    return wrapper  # type: ignore[return-value]
