"""Distributed pieces on 2 forked gloo ranks in-process (tests.helpers.run_distributed): no launcher, no DeepSpeed."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist

from llmforge.demo.toy_chat import sft_records
from llmforge.posttrain.data import SFTData
from llmforge.tokenizer import CharTokenizer
from llmforge.tokenizer.added import with_chat_tokens
from llmforge.train.checkpoint_files import _any_rank
from llmforge.train.distributed import setup_env, stale_build_locks
from llmforge.train.guard import StopSignal
from llmforge.train.trainer import reduce_step_values
from tests.helpers import run_distributed


def _step_values() -> list[float]:
    rank = dist.get_rank()
    loss = torch.tensor(2.0 + rank)  # 2 and 3
    stats = {"accuracy": torch.tensor(0.5 * rank)}  # 0 and 0.5
    return reduce_step_values(loss, stop=rank == 1, tokens=100 * (rank + 1), stats=stats, world=2).tolist()


def test_step_values_mean_the_loss_sum_the_tokens_and_count_stops():
    for values in run_distributed(_step_values):
        assert values == [2.5, 1.0, 300.0, 0.0, 0.25]  # mean loss, ranks asked to stop, all tokens, corrupt, metric


def _any() -> tuple[bool, bool]:
    return _any_rank(dist.get_rank() == 1), _any_rank(False)


def test_a_flag_raised_on_one_rank_is_seen_by_every_rank():
    assert run_distributed(_any) == [(True, False), (True, False)]


def test_sft_batches_count_their_tokens_without_padding():
    """Throughput counts what the model read: rows are padded to the longest row of the micro-batch, and the
    padding is not counted."""
    records = [(f"toy:{i}", rec) for i, rec in enumerate(sft_records(16, seed=0))]
    tok = with_chat_tokens(CharTokenizer.train([str(r) for _, r in records], 256))
    data = SFTData(records, tok, seq_len=96, seed=0)
    inputs, targets, lengths = batch = data.batch(range(8))
    real = [min(len(data.examples[data.example_index(i)].ids), 97) - 1 for i in range(8)]  # rendered, shifted
    assert lengths.tolist() == real
    assert inputs.shape[1] == max(lengths.tolist()) and min(lengths.tolist()) < inputs.shape[1]
    assert data.tokens(batch) == sum(lengths.tolist()) < inputs.numel()


def test_build_locks_left_by_a_killed_build_are_found(tmp_path, monkeypatch):
    """A lock older than 10 minutes in the extension cache is reported (a run would otherwise wait on it forever);
    one being held by a running build is not."""
    for op, age in (("fused_adam", 3600), ("deepspeed_shm_comm", 5)):
        (tmp_path / op).mkdir()
        lock = tmp_path / op / "lock"
        lock.touch()
        os.utime(lock, (time.time() - age, time.time() - age))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert stale_build_locks() == [str(tmp_path / "fused_adam" / "lock")]


def test_every_process_of_an_environment_builds_ops_with_its_ninja(monkeypatch):
    """A process started without the environment's bin/ on PATH (a bare `.venv/bin/python`, the ranks a test forks)
    finds the same ninja as one started from it (the deepspeed launcher): two ninja versions hash build commands
    differently, and DeepSpeed's CPU comm op was rebuilt at every switch between them (8 times in one test run)."""
    bindir = os.path.dirname(sys.executable)
    if not os.access(os.path.join(bindir, "ninja"), os.X_OK):
        pytest.skip("the environment has no ninja of its own: whichever PATH finds is the only one")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", bindir]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    setup_env()
    assert shutil.which("ninja") == os.path.join(bindir, "ninja")
    assert os.environ["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]
    setup_env()  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]


def test_both_preemption_signals_set_the_stop_flag():
    """SIGUSR1 (slurm's warning) and SIGTERM (its kill) reach the same handler; the launched tests send one each
    (test_faults: SIGTERM, test_slurm: USR1)."""
    saved = {s: signal.getsignal(s) for s in StopSignal.SIGNALS}
    try:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            stop = StopSignal()
            assert not stop.requested
            signal.raise_signal(signum)
            assert stop.requested and stop.signum == signum
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
