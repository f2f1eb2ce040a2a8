"""Slurm end to end: submit a 2-task run, preempt it with USR1 mid-run, and check that it saved, requeued itself,
resumed and finished with exactly the losses of an uninterrupted run."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.helpers import ds_cmd, losses_after_last_start, rows, run_cli, write_recipe
from tests.integration.slurm_cluster import SlurmCluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = SlurmCluster.missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"slurm is required under CI: {why}")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def wait_for(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}\n{detail()}")


def test_dry_run_quotes_every_value(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "it's.yaml", prepared, tmp_path / "runs")
    r = run_cli(
        sys.executable,
        "launch/slurm/submit.py",
        "--recipe",
        str(recipe),
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu; rm -rf /",
        "--time",
        "1:00:00",
        "--set",
        "run.name=a b",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert "#SBATCH --partition='gpu; rm -rf /'" in script and "#SBATCH --gpus-per-node=4" in script
    assert f"--recipe '{tmp_path}/it'\"'\"'s.yaml'" in script and "--set 'run.name=a b'" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@300" in script and "--resume auto" in script
    bad = run_cli(sys.executable, "launch/slurm/submit.py", "--recipe", str(tmp_path / "none.yaml"), "--dry-run")
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: --recipe {tmp_path / 'none.yaml'}: file not found"


def test_dry_run_passes_the_layout_and_keeps_tensor_groups_in_a_node(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs", model={"n_heads": 8, "n_kv_heads": 4})
    submit = (sys.executable, "launch/slurm/submit.py", "--recipe", str(recipe), "--nodes", "2", "--dry-run")
    r = run_cli(*submit, "--gpus-per-node", "4", "--tensor", "2", "--sequence", "2")
    assert r.returncode == 0, r.stderr
    assert "--set parallel.tensor=2 --set parallel.sequence=2" in r.stdout and "--distribution=block" in r.stdout
    r = run_cli(*submit, "--gpus-per-node", "2", "--tensor", "4")  # a tensor group would span two nodes
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "recipe error: --set: parallel.tensor: tensor groups stay inside a node: tensor=4 must divide the 2 "
        "ranks per node"
    ]


def test_preempt_requeue_resume_matches_uninterrupted(tmp_path, prepared, slurm):
    steps = 200
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": "base"},
        train={"max_steps": steps, "warmup_steps": 5},
        checkpoint={"interval": 50},
        eval={"interval": 0},
    )
    r = run_cli(*ds_cmd(recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    baseline = losses_after_last_start(tmp_path / "runs" / "base")

    run_dir = tmp_path / "runs" / "sl"
    r = run_cli(
        sys.executable,
        "launch/slurm/submit.py",
        "--recipe",
        str(recipe),
        "--cpu",
        "--gpus-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--output",
        str(tmp_path / "slurm-%j.out"),
        "--set",
        "run.name=sl",
        env={"SLURM_CONF": str(slurm.conf)},
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split()[-1]
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 10, 240, "training to start")
    started = time.time()
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0

    def diagnosis() -> str:
        out = tmp_path / f"slurm-{job}.out"
        state = slurm.run("scontrol", "show", "job", job).stdout
        return f"{state}\n--- {out.name} (tail) ---\n{out.read_text()[-4000:] if out.exists() else '(missing)'}"

    wait_for(lambda: slurm.job_field(job, "Restarts") == "1", 120, "the job to requeue itself", diagnosis)

    def finished() -> bool:
        state = slurm.job_field(job, "JobState")
        if state == "PENDING":  # slurm holds a requeued job back for a while (BeginTime): release it now
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        return state == "COMPLETED"

    wait_for(finished, 300, "the requeued job to finish", diagnosis)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log

    all_rows = rows(run_dir)
    (pre,) = [x for x in all_rows if x.get("event") == "preempted"]
    (res,) = [x for x in all_rows if x.get("event") == "resumed"]
    assert 10 <= pre["step"] < steps and res["step"] == pre["step"] and pre["signal"] == 10
    assert pre["signal_to_saved_s"] < time.time() - started
    after = losses_after_last_start(run_dir)
    assert sorted(after) == list(range(pre["step"] + 1, steps + 1))
    assert all(after[s] == baseline[s] for s in after)  # nothing lost: the same losses, bit for bit
