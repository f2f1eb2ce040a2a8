"""The training step's host side: micro-batches read ahead on a background thread (data.prefetch), and the spike
guard's verdict taken on the device (no host wait inside the step)."""

import math
import threading
import time

import pytest
import torch

from llmforge.config.data import DatasetSpec
from llmforge.config.recipe import SpikeGuardConfig
from llmforge.data.loader import PretrainData, micro_batch_indices, next_micro_batch
from llmforge.data.prefetch import Prefetcher
from llmforge.errors import DataError
from llmforge.train.guard import SpikeGuard


class Reads:
    """read(key) for a Prefetcher that records which thread read which key."""

    def __init__(self, fail_at=None, delay=0.0):
        self.log, self.fail_at, self.delay = [], fail_at, delay

    def __call__(self, key):
        self.log.append((key, threading.current_thread().name))
        time.sleep(self.delay)
        if key == self.fail_at:
            raise DataError(f"shard for key {key} is shorter than its manifest says")
        return torch.full((2, 3), key)


def test_prefetcher_returns_every_batch_in_order_and_reads_ahead_on_one_thread():
    reads = Reads()
    p = Prefetcher(reads, lambda k: k + 1, depth=2)
    try:
        for k in range(6):
            assert torch.equal(p.get(k), torch.full((2, 3), k))
            assert sorted(p.pending) == [k + 1, k + 2]  # the next two are on their way
        p.pending[7].result()
        threads = {name for _, name in reads.log}
        assert len(threads) == 1 and threads.pop().startswith("llmforge-prefetch")
        assert [key for key, _ in reads.log] == list(range(8))  # each key read once, in order
    finally:
        p.close()


def test_prefetcher_overlaps_reading_with_the_callers_work():
    reads = Reads(delay=0.2)
    p = Prefetcher(reads, lambda k: k + 1, depth=1)
    try:
        p.get(0)
        time.sleep(0.3)  # the "step": batch 1 is read meanwhile
        started = time.perf_counter()
        p.get(1)
        assert time.perf_counter() - started < 0.1
    finally:
        p.close()


def test_prefetcher_after_a_jump_reads_the_asked_key_and_drops_the_stale_ones():
    reads = Reads()
    p = Prefetcher(reads, lambda k: k + 1, depth=2)
    try:
        p.get(0)
        assert torch.equal(p.get(10), torch.full((2, 3), 10))
        assert sorted(p.pending) == [11, 12]
        assert torch.equal(p.get(11), torch.full((2, 3), 11))
    finally:
        p.close()
    assert p.pool is None


def test_prefetcher_raises_a_read_error_for_its_own_batch_only():
    p = Prefetcher(Reads(fail_at=3), lambda k: k + 1, depth=2)
    try:
        for k in range(3):  # key 3 already failed on the thread; batches before it are unharmed
            assert torch.equal(p.get(k), torch.full((2, 3), k))
        with pytest.raises(DataError, match="key 3 is shorter than its manifest"):
            p.get(3)
    finally:
        p.close()


def test_prefetch_depth_zero_reads_in_the_callers_thread():
    reads = Reads()
    p = Prefetcher(reads, lambda k: k + 1, depth=0)
    assert torch.equal(p.get(4), torch.full((2, 3), 4))
    assert reads.log == [(4, threading.current_thread().name)]
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(reads, lambda k: k + 1, depth=-1)


def test_prefetched_training_batches_equal_direct_reads(prepared):
    """The trainer's keys (consumed_samples, micro_step): two ranks' micro-batches over steps of 3 accumulations."""
    data = PretrainData([DatasetSpec(str(prepared / "prepared" / "stdlib"))], 64, seed=3)
    rank, world, micro, accum = 1, 2, 4, 3

    def read(key):
        return data.batch(micro_batch_indices(key[0], key[1], rank, world, micro))

    def successor(key):  # the order the trainer reads ahead in
        return next_micro_batch(*key, accum, micro * accum * world)

    p = Prefetcher(read, successor, depth=3)
    fresh = PretrainData([DatasetSpec(str(prepared / "prepared" / "stdlib"))], 64, seed=3)
    try:
        for consumed in range(0, 5 * micro * accum * world, micro * accum * world):
            for m in range(accum):
                got = p.get((consumed, m))
                want = fresh.batch(micro_batch_indices(consumed, m, rank, world, micro))
                assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        p.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_batches_copy_to_the_gpu_without_a_host_wait():
    p = Prefetcher(
        lambda k: (torch.full((8, 2048), k), torch.full((8, 2048), k + 1)),
        lambda k: k + 1,
        depth=2,
        pin_device=torch.device("cuda"),
    )
    try:
        x, y = p.get(0)
        assert x.is_pinned() and y.is_pinned()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
        try:
            x.to("cuda", non_blocking=True)
            x, _ = p.get(1)
            x.to("cuda", non_blocking=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        p.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_guard_verdict_on_the_device_is_the_host_verdict(enabled):
    guard = SpikeGuard(SpikeGuardConfig(enabled=enabled, min_history=4, threshold_std=3.0))
    history = [2.50, 2.45, 2.52, 2.40, 2.47]
    losses = [2.3, 2.49, 2.55, 2.9, 3.5, 40.0, math.nan, math.inf, -math.inf]
    for i, x in enumerate(history):
        # while the history is short only non-finite losses are refused
        for loss in losses:
            rejected = guard.reject(torch.tensor(loss))
            verdict = guard.judge(loss)
            if not enabled:
                assert rejected is None and verdict is None
                continue
            assert bool(rejected) == (verdict is not None), (i, loss)
            if verdict is not None:
                assert guard.reason(loss) == verdict
        guard.record(i + 1, x, skipped=False)
    if enabled:  # with the full history the limit sits between the normal losses and the spikes
        assert [guard.judge(x) for x in losses[:6]] == [None, None, None, "spike", "spike", "spike"]
        assert guard.limit() == pytest.approx(2.468 + 3 * math.sqrt(sum((x - 2.468) ** 2 for x in history) / 5))
