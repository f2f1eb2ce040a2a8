"""Fault tolerance on 2 CPU ranks: NaN/inf/spike steps skipped and logged, rollback on persistent divergence, and
preemption by signal (save, exit 75, resume with the uninterrupted run's losses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import REPO, ds_cmd, losses_after_last_start, rows, run_cli, write_recipe

pytestmark = pytest.mark.distributed


def recipe(tmp_path: Path, prepared: Path, name: str, **train) -> Path:
    return write_recipe(
        tmp_path / f"{name}.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": name},
        train={"max_steps": 14, "warmup_steps": 2, **train},
        eval={"interval": 0},
        checkpoint={"interval": 4, "keep_last": 10},
    )


def training_state(checkpoint: Path) -> list[torch.Tensor]:
    """Every tensor of a DeepSpeed checkpoint's model weights and both ranks' optimizer partitions (fp32 masters,
    Adam moments), in a fixed order."""
    tensors: list[torch.Tensor] = []

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for f in sorted(checkpoint.glob("*model_states.pt")):
        walk(torch.load(f, map_location="cpu", weights_only=False)["module"])
    optim = sorted(checkpoint.glob("*optim_states.pt"))
    assert len(optim) == 2
    for f in optim:
        walk(torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"])
    return tensors


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_nan_inf_and_spike_steps_are_skipped_and_logged(tmp_path, prepared):
    path = write_recipe(
        tmp_path / "faults.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": "faults"},
        train={"max_steps": 14, "warmup_steps": 2, "spike_guard": {"min_history": 5}},
        eval={"interval": 0},
        checkpoint={"interval": 1, "keep_last": 20},
    )
    r = run_cli(*ds_cmd(path), env={"LLMFORGE_FAULTS": "nan@5,inf@7,spike@11"})
    assert r.returncode == 0, r.stderr[-3000:]
    all_rows = rows(tmp_path / "runs" / "faults")
    skipped = {x["step"]: x["reason"] for x in all_rows if x.get("event") == "skipped_step"}
    assert skipped == {5: "non_finite", 7: "non_finite", 11: "spike"}
    losses = {x["step"]: x["loss"] for x in all_rows if "loss" in x and "event" not in x}
    assert losses[5] is None and losses[7] is None and losses[11] > 2 * losses[10]
    # nothing non-finite leaked into the weights: every later step trains normally
    for step in (6, 8, 9, 10, 12, 13, 14):
        assert losses[step] is not None and losses[step] < losses[1]
    assert losses[14] < losses[4]
    # a skipped step changed neither the weights nor the optimizer state; the step after it did. The spike's loss is
    # finite, so only the guard's verdict (taken on the device, before the last backward) keeps it out
    ckpts = tmp_path / "runs" / "faults" / "checkpoints"
    state = {s: training_state(ckpts / f"step_{s:08d}") for s in (4, 5, 6, 10, 11, 12)}
    assert same(state[4], state[5]) and same(state[10], state[11])
    assert not same(state[5], state[6]) and not same(state[11], state[12])


def test_persistent_divergence_rolls_back_and_skips_the_window(tmp_path, prepared):
    r = run_cli(
        *ds_cmd(recipe(tmp_path, prepared, "diverge", spike_guard={"max_bad_steps": 3, "bad_window": 10})),
        env={"LLMFORGE_FAULTS": "nan@9,nan@10,inf@11"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    all_rows = rows(tmp_path / "runs" / "diverge")
    (rb,) = [x for x in all_rows if x.get("event") == "rollback"]
    assert rb["step"] == 11 and rb["to_step"] == 8 and rb["skipped_samples"] == 3 * 8
    after = all_rows[all_rows.index(rb) + 1 :]
    steps = [x["step"] for x in after if "loss" in x and "event" not in x]
    assert steps == list(range(9, 15))  # steps 9-14 redone on fresh data
    assert all(x["loss"] is not None for x in after if "loss" in x and "event" not in x)
    last = [x for x in after if "loss" in x and "event" not in x][-1]
    assert last["tokens"] == (14 + 3) * 8 * 64  # the data window of the bad steps was skipped, not replayed


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    return [
        p.pid
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "launch/pretrain.py" in " ".join(p.cmdline()) and "--local_rank" in " ".join(p.cmdline())
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM])  # SIGUSR1 takes the same handler: test_slurm preempts with it
def test_signal_saves_exits_75_and_resume_matches_uninterrupted(tmp_path, prepared, signum):
    steps = 30
    base = recipe(tmp_path, prepared, "base", max_steps=steps)
    r = run_cli(*ds_cmd(base))
    assert r.returncode == 0, r.stderr[-3000:]
    baseline = losses_after_last_start(tmp_path / "runs" / "base")

    cfg = recipe(tmp_path, prepared, "pre", max_steps=steps)
    metrics = tmp_path / "runs" / "pre" / "metrics.jsonl"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ds_cmd(cfg), cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    pids = _rank_pids(proc)
    assert len(pids) == 2
    os.kill(pids[0], signum)  # one rank only: the all-reduced flag must stop both
    assert proc.wait(timeout=120) == 75
    all_rows = rows(tmp_path / "runs" / "pre")
    (pre,) = [x for x in all_rows if x.get("event") == "preempted"]
    assert pre["signal"] == signum and pre["step"] < steps and pre["signal_to_saved_s"] < 30
    pointer = tmp_path / "runs" / "pre" / "checkpoints" / "latest"
    assert pointer.read_text().strip() == f"step_{pre['step']:08d}"

    r = run_cli(*ds_cmd(cfg, "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    after = losses_after_last_start(tmp_path / "runs" / "pre")
    assert sorted(after) == list(range(pre["step"] + 1, steps + 1))
    assert all(after[s] == baseline[s] for s in after)  # nothing lost, bit for bit
    json.dumps(pre)


def test_rank_killed_while_saving_resumes_from_previous_checkpoint(tmp_path, prepared):
    cfg = recipe(tmp_path, prepared, "die", max_steps=12)
    r = run_cli(*ds_cmd(cfg), env={"LLMFORGE_FAULTS": "die_in_save@8"})
    assert r.returncode != 0
    ckpts = tmp_path / "runs" / "die" / "checkpoints"
    assert (ckpts / "step_00000008").is_dir() and not (ckpts / "step_00000008" / "manifest.json").exists()
    first = losses_after_last_start(tmp_path / "runs" / "die")
    r = run_cli(*ds_cmd(cfg, "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    (resumed,) = [x for x in rows(tmp_path / "runs" / "die") if x.get("event") == "resumed"]
    assert resumed["step"] == 4
    after = losses_after_last_start(tmp_path / "runs" / "die")
    assert all(after[s] == first[s] for s in range(5, 9))  # nothing lost beyond the last checkpoint
    assert (ckpts / "step_00000008" / "manifest.json").exists()  # the leftover was replaced by a complete save


def test_enospc_while_saving_is_one_line_and_keeps_previous(tmp_path, prepared):
    cfg = recipe(tmp_path, prepared, "enospc", max_steps=12)
    r = run_cli(*ds_cmd(cfg), env={"LLMFORGE_FAULTS": "enospc_in_save@8"})
    assert r.returncode == 2
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("checkpoint error:")]
    assert lines == [
        "checkpoint error: saving step_00000008 failed on rank 1: No space left on device; nothing of "
        "it was committed, the last complete checkpoint (step_00000004) is intact"
    ]
    r = run_cli(*ds_cmd(cfg, "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in rows(tmp_path / "runs" / "enospc") if x.get("event") == "resumed"] == [4]


@pytest.fixture()
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs under CI: {r.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_skips_the_save_and_keeps_previous(tmp_path, prepared, small_tmpfs):
    cfg = write_recipe(
        tmp_path / "full.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": "full"},
        train={"max_steps": 12, "warmup_steps": 2},
        eval={"interval": 0},
        checkpoint={"interval": 4, "keep_last": 10, "dir": str(small_tmpfs)},
    )
    r = run_cli(*ds_cmd(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    all_rows = rows(tmp_path / "runs" / "full")
    assert [x["step"] for x in all_rows if x.get("event") == "checkpoint"] == [4]
    assert [x["step"] for x in all_rows if x.get("event") == "checkpoint_skipped"] == [8, 12]
    from llmforge.train.checkpoint_files import newest_complete

    assert newest_complete(str(small_tmpfs)) == str(small_tmpfs / "step_00000004")


def test_a_timed_out_command_takes_its_whole_process_group_with_it(tmp_path):
    """run_cli's timeout kills the launcher and everything it started (a rank is a grandchild of the test), so no
    rank stays behind holding its cores or a build lock."""
    pidfile = tmp_path / "grandchild.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait", timeout=3)
    grandchild = int(pidfile.read_text())
    deadline = time.time() + 10
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the grandchild outlived the timeout"
        time.sleep(0.1)
