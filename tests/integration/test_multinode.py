"""Two "nodes" on localhost: two DeepSpeed launchers (--no_ssh, node ranks 0 and 1, one rank each) run the same
training as one node with two ranks, step for step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, ds_cmd, free_port, losses_after_last_start, run_cli, write_recipe

pytestmark = pytest.mark.distributed


def test_two_launchers_no_ssh_match_one_node(tmp_path, prepared):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 8, "warmup_steps": 2},
        checkpoint={"interval": 4},
        eval={"interval": 4},
    )
    r = run_cli(*ds_cmd(recipe, "--set", "run.name=one"))
    assert r.returncode == 0, r.stderr[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    procs = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "deepspeed"),
                "--no_ssh",
                "--hostfile",
                str(hostfile),
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "launch/pretrain.py",
                "--recipe",
                str(recipe),
                "--set",
                "run.name=two",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    one = losses_after_last_start(tmp_path / "runs" / "one")
    two = losses_after_last_start(tmp_path / "runs" / "two")
    assert one == two and sorted(two) == list(range(1, 9))
    assert (tmp_path / "runs" / "two" / "checkpoints" / "step_00000008" / "manifest.json").exists()


def test_runs_leave_no_shared_memory_behind(tmp_path, prepared):
    """DeepSpeed's CPU allreduce buffers (/dev/shm, ~67 MB per rank) are unlinked after start-up, also when the run
    is killed afterwards."""
    import glob

    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 2, "warmup_steps": 1},
        checkpoint={"interval": 0},
        eval={"interval": 0},
    )
    port = free_port()
    cmd = ds_cmd(recipe)
    cmd[cmd.index("--master_port") + 1] = str(port)
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []
