"""Every bad-input class of a training launch ends in one line and exit code 2, nothing written; the run files."""

import json

import pytest
import yaml

from llmforge.config import load_recipe
from llmforge.errors import RecipeError
from tests.helpers import REPO, rows, run_cli, train_rows, write_recipe

BAD = [
    # (recipe edits, extra CLI args, expected key, expected fragment)
    ({"train": {"lr": -1.0}}, [], "train.lr", "must be > 0"),
    ({"train": {"lrr": 1.0}}, [], "train.lrr", "did you mean 'lr'"),
    ({"modle": {}}, [], "modle", "did you mean 'model'"),
    ({"train": {"max_steps": "ten"}}, [], "train.max_steps", "must be an integer"),
    ({"model": {"d_model": 30, "n_heads": 4}}, [], "model.d_model", "not divisible by n_heads"),
    ({"model": {"n_heads": 4, "n_kv_heads": 3}}, [], "model.n_kv_heads", "not divisible"),
    ({"model": {"mlp": "relu"}}, [], "model.mlp", "must be one of swiglu | gelu"),
    ({"deepspeed": {"config": "ds_configs/nope.json"}}, [], "deepspeed.config", "file not found"),
    ({"tokenizer": {"path": "/nonexistent/tok.json"}}, [], "tokenizer.path", "not found: /nonexistent"),
    ({"deepspeed": {"overrides": {"train_batch_size": 7}}}, [], "deepspeed.overrides", "train_batch_size=7"),
    ({}, ["--set", "train.nope=1"], "train.nope", "unknown key"),
    ({}, ["--set", "train.lr"], "--set", "expected KEY=VALUE"),
    ({"train": {"warmup_steps": 50, "max_steps": 10}}, [], "train.warmup_steps", "exceeds"),
    ({"model": {"vocab_size": 10}}, [], "model.vocab_size", "below the tokenizer's"),
    ({"parallel": {"tensor": 2}}, [], "parallel", "tensor 2 x sequence 1 = 2 does not divide the 1 ranks"),
    ({}, ["--set", "parallel.sequence=0"], "parallel.sequence", "must be > 0"),
]


@pytest.mark.parametrize("edits,args,key,fragment", BAD, ids=[b[2] + ":" + b[3][:12] for b in BAD])
def test_bad_recipe_one_line_exit_2_nothing_written(tmp_path, prepared, edits, args, key, fragment):
    path = write_recipe(tmp_path / "bad.yaml", prepared, tmp_path / "runs", **edits)
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr
    origin = "--set" if args else str(path)  # the error names the file that declared the key, or --set
    assert lines[0].startswith(f"recipe error: {origin}: {key}: " if key != "--set" else "recipe error: --set: ")
    assert fragment in lines[0]
    assert not (tmp_path / "runs").exists()


def test_compile_without_a_compiler_is_one_line(tmp_path, prepared):
    """train.compile on a CPU machine where Inductor finds no C++ compiler: refused before anything is written."""
    path = write_recipe(tmp_path / "c.yaml", prepared, tmp_path / "runs", train={"compile": True})
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), env={"CXX": "no-such-c++-compiler"})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"recipe error: {path}: train.compile: torch.compile on CPU needs a C++ compiler (g++, clang++ "
        "or the one $CXX names); none was found; or set train.compile: false"
    )
    assert not (tmp_path / "runs").exists()


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\ntrain: {lr: 1e-3\n  max_steps: 3\n")
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"recipe error: {path}: line ") and "YAML syntax error" in line


def test_missing_recipe_and_extends(tmp_path):
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "file not found" in result.stderr and len(result.stderr.splitlines()) == 1
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\n")
    with pytest.raises(RecipeError, match=f"extends: file not found: {tmp_path / 'parent.yaml'} "):
        load_recipe(str(child))


def test_resolved_recipe_and_ds_config_saved(tmp_path, prepared):
    """The run directory records exactly what ran (checked on a 1-process run of 2 steps)."""
    path = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 2, "warmup_steps": 1},
        eval={"interval": 0},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
        logging={"interval": 1, "tensorboard": True},
    )
    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), "--set", "train.lr=2e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["lr"] == 2e-3 and resolved["model"]["vocab_size"] > 0
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["optimizer"]["params"]["lr"] == 2e-3
    assert ds["timers"] == {"throughput": {"enabled": False}}
    train = train_rows(run)
    assert [r["step"] for r in train] == [1, 2]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "eta_s"):
        assert key in train[0]
    assert train[0]["mfu"] is None  # no peak FLOPs on CPU
    assert train[1]["tokens"] == 2 * 4 * 64
    summary = run_cli("llmforge", "summary", "--run", str(run))
    assert summary.returncode == 0 and "steps 2 | val loss first n/a" in summary.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in train], rel=1e-6)
    # one series per quantity: no second copy of the loss and LR from DeepSpeed's own monitor
    keys = ("tokens", "loss", "loss_mean", "lr", "grad_norm", "tokens_per_s", "mem_gb", "eta_s", "tokens.stdlib")
    assert set(acc.Tags()["scalars"]) == {f"train/{k}" for k in keys}
    # every row has its wall-clock time; the interval mean (interval 1 here: the step's loss)
    assert all(isinstance(r["time"], float) for r in rows(run)) and train[0]["time"] <= train[1]["time"]
    assert [r["loss_mean"] for r in train] == [r["loss"] for r in train]
    # the console's lines are in the run directory too
    log = (run / "train.log").read_text()
    assert "model: " in log and "step 2 | loss " in log and not (run / "logs" / "rank0.log").exists()


def test_a_corrupt_shard_stops_every_rank_in_one_line_each(tmp_path, prepared):
    """Bytes overwritten in a .bin (same size). A dataset over data.verify_mb is not hashed at open: the sample
    read from it stops both ranks at the same step, each with one line (the reader names the shard and document),
    no traceback; the default check hashes a small dataset at open instead; verify-data finds it."""
    import shutil

    from tests.helpers import ds_cmd

    data = tmp_path / "data"
    shutil.copytree(prepared / "prepared", data / "prepared")
    shards = data / "prepared" / "stdlib"
    with open(shards / "train-00000.bin", "r+b") as f:
        f.write(b"\xff\xff" * 20_000)  # the first 20,000 tokens: every early sample of both ranks is corrupt
    path = write_recipe(tmp_path / "r.yaml", data, tmp_path / "runs", data={"verify_mb": 0})
    result = run_cli(*ds_cmd(path), timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [x for x in (result.stdout + result.stderr).splitlines() if "data error:" in x]
    assert len(lines) == 2, result.stdout[-3000:] + result.stderr[-3000:]
    for line in lines:
        assert f"{shards}/train-00000.bin: token id 65535 at document " in line and "outside the vocabulary" in line
    for rank in (0, 1):  # each rank's error is in the run directory, not only on the terminal
        assert "data error: " in (tmp_path / "runs" / "t" / "logs" / f"rank{rank}.log").read_text()

    result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), "--set", "data.verify_mb=256")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"data error: {shards}/train-00000.bin: its sha256 differs from the manifest's (the file was changed after "
        "preparation); re-run launch/prepare_data.py"
    ]
    result = run_cli("llmforge", "verify-data", str(shards))
    assert (
        result.returncode == 1
        and result.stdout.splitlines()[0] == f"FAIL {shards}/train-00000.bin: sha256 differs from the manifest's"
    )
    assert run_cli("llmforge", "verify-data", str(prepared / "prepared" / "stdlib")).stdout.startswith("ok ")


def test_a_master_port_in_use_is_one_line_naming_the_flag(tmp_path, prepared):
    """Another job holds the rendezvous port: rank 0 (which hosts the store) says so in one line, at once
    (torch.distributed waited minutes, then printed a DistNetworkError EADDRINUSE traceback). Rank 0 of a 2-rank
    world as a launcher starts it, alone: the check runs before any other rank is needed."""
    import socket
    import time

    path = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs")
    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        started = time.time()
        result = run_cli("python", "launch/pretrain.py", "--recipe", str(path), env=env, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} (MASTER_PORT) is in use on this node, by another job?: choose a free one with the "
        "launcher's --master_port N (deepspeed), --master-port N (torchrun) or MASTER_PORT"
    ]
    assert time.time() - started < 60 and not (tmp_path / "runs").exists()
