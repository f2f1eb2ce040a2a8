"""Read training micro-batches ahead of the step on one background thread, pinned for an asynchronous GPU copy.

The trainer asks for micro-batches by key (consumed_samples, micro_step); the keys follow one another in a known
order, so while the step computes on micro-batch k the thread reads k+1 .. k+depth. A key that was not read ahead
(the first one, or a jump) is read at once. All reads of the dataset happen on the one thread, so the dataset's
caches are never touched by two threads. An error while reading is raised by `get` for the micro-batch it belongs
to, as it would be without prefetching.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch


def pin(batch: Any) -> Any:
    """The batch with every tensor in page-locked memory (tuples, lists and dicts of tensors are walked)."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, (tuple, list)):
        return type(batch)(pin(x) for x in batch)
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    return batch


class Prefetcher:
    """get(key) returns read(key); the next `depth` keys (by successor) are read meanwhile on a background thread.

    pin_device: a CUDA device to pin batches for (page-locked memory makes `.to(device, non_blocking=True)` a copy
    that does not wait for the GPU), or None (CPU training: pinning gains nothing).
    """

    def __init__(
        self,
        read: Callable[[Any], Any],
        successor: Callable[[Any], Hashable],
        depth: int,
        pin_device: Optional[torch.device] = None,
    ):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.read, self.successor, self.depth, self.pin_device = read, successor, depth, pin_device
        self.pending: collections.OrderedDict[Hashable, Future] = collections.OrderedDict()
        self.pool: Optional[ThreadPoolExecutor] = None
        if depth:
            init = (lambda: torch.cuda.set_device(pin_device)) if pin_device is not None else None
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmforge-prefetch", initializer=init)

    def _load(self, key: Hashable) -> Any:
        batch = self.read(key)
        return pin(batch) if self.pin_device is not None else batch

    def get(self, key: Hashable) -> Any:
        if self.pool is None:
            return self._load(key)
        future = self.pending.pop(key, None)
        if future is None:  # not read ahead: drop what was (it follows another key), read this one now
            self._drain()
            future = self.pool.submit(self._load, key)
        nxt = key
        for _ in range(self.depth):
            nxt = self.successor(nxt)
            if nxt not in self.pending:
                self.pending[nxt] = self.pool.submit(self._load, nxt)
        return future.result()

    def _drain(self) -> None:
        for future in self.pending.values():
            future.cancel()
        for future in self.pending.values():
            if not future.cancelled():
                future.exception()  # wait; a read-ahead that failed belongs to a key nobody asks for now
        self.pending.clear()

    def close(self) -> None:
        if self.pool is not None:
            self._drain()
            self.pool.shutdown(wait=True)
            self.pool = None
