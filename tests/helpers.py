"""What tests share: recipe files, running a command, DeepSpeed launch lines, metrics rows, and an in-process gloo
harness for distributed pieces that do not need the launcher."""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import sysconfig
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from llmforge.config import load_recipe
from llmforge.config.recipe import ActivationCheckpointingConfig, ModelConfig
from llmforge.model import GPT, apply_activation_checkpointing, compile_model
from llmforge.train.metrics import read_metrics
from tests.real_inputs import STDLIB

REPO = Path(__file__).resolve().parents[1]
BIG_TEXT = STDLIB / "pydoc_data" / "topics.py"  # 757 KB: a real one-file corpus


def write_recipe(path: Path, data_dir: Path, run_dir: Path, **sections: dict) -> Path:
    """A tiny recipe (fast on CPU) pointing at data_dir; keyword sections are merged over the defaults."""
    recipe: dict[str, Any] = {
        "run": {"name": "t", "output_dir": str(run_dir), "seed": 7},
        "data": {
            "sources": [{"name": "stdlib", "type": "text", "paths": [str(data_dir / "corpus" / "*.txt")]}],
            "prepared_dir": str(data_dir / "prepared"),
            "seq_len": 64,
            "val_fraction": 0.1,
        },
        "tokenizer": {"type": "char", "path": str(data_dir / "prepared" / "tokenizer.json")},
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "train": {
            "max_steps": 12,
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "precision": "fp32",
        },
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero2.json")},
        "checkpoint": {"interval": 4, "keep_last": 5},
        "eval": {"interval": 6, "batches": 2},
        "logging": {"interval": 1, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command (a launch script via this interpreter, or a console tool from the venv) and capture output. The
    command runs in a session of its own: on a timeout the whole process group is killed — the deepspeed launcher
    and the ranks it started — so no rank outlives its test (an orphaned rank holds its cores, and one killed while
    JIT-building a DeepSpeed op leaves the build lock behind)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.Popen(
        list(args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:  # an interrupt (Ctrl-C) while waiting
            kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(pid: int) -> None:
    """SIGKILL every process of the group `pid` leads."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_cmd(recipe: Path, *extra: str, script: str = "launch/pretrain.py", ranks: int = 2) -> list[str]:
    """The DeepSpeed launcher line that trains `recipe` on `ranks` CPU ranks."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [
        launcher,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        script,
        "--recipe",
        str(recipe),
        *extra,
    ]


def rows(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl (through llmforge's own reader)."""
    return read_metrics(str(run_dir))


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "loss" in r and "event" not in r]


def losses_after_last_start(run_dir: Path) -> dict[int, float]:
    """step -> loss of the rows after the last resume (all rows when the run never resumed)."""
    all_rows = rows(run_dir)
    starts = [i for i, r in enumerate(all_rows) if r.get("event") == "resumed"]
    tail = all_rows[starts[-1] + 1 :] if starts else all_rows
    return {r["step"]: r["loss"] for r in tail if "loss" in r and "event" not in r}


def _distributed_worker(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out.put((rank, "ok", fn(*args)))
    except BaseException:  # reported to the parent, which fails the test with the rank's traceback
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 120, start: str = "fork"
) -> list[Any]:
    """Run fn(*args) on `world_size` forked CPU processes joined in a gloo process group (no launcher, no new
    interpreter: OLMo-core's run_distributed_test); returns each rank's result, in rank order. fn must be defined at
    module level and return something picklable (not tensors: plain values or numpy arrays). start="spawn" starts
    fresh interpreters instead: a forked child hangs in its first multi-threaded torch op once the parent process
    has run one (OpenMP's thread pool does not survive fork)."""
    ctx = mp.get_context(start)
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_distributed_worker, args=(fn, r, world_size, port, args, out)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, status, value = out.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, max_seq_len=48, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def saved_bytes(fn) -> tuple[int, int]:
    """(total, largest) bytes of the tensors autograd keeps for backward while fn() runs."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), max(sizes)


def stdlib_texts(start: int, stop: int) -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[start:stop]
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def corpus(root: Path, n_files: int = 6, per_file: int = 12, seed: int = 0) -> dict:
    """JSONL files of distinct essays, with planted duplicates spread over different files."""
    rng = random.Random(seed)
    docs = [[essay(rng) for _ in range(per_file)] for _ in range(n_files)]
    original = docs[0][0]
    words = original.split()
    for i in (3, 40):  # a near-duplicate: two words changed, in another file
        words[i] = "zebra"
    docs[4][5] = " ".join(words)
    docs[2][7] = original.upper().replace(".", "!")  # an exact duplicate after normalisation
    root.mkdir(parents=True, exist_ok=True)
    for f, rows in enumerate(docs):
        (root / f"part{f}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows) + "\n")
    return {"near": docs[4][5], "exact": docs[2][7], "original": original, "total": n_files * per_file}


def recipe_for(tmp: Path, data: Path, out: str, **data_kw) -> tuple[object, str]:
    path = write_recipe(
        tmp / f"{out}.yaml",
        tmp,
        tmp / "runs",
        data={
            "sources": [{"name": "web", "type": "jsonl", "paths": [str(data / "*.jsonl")], "quality": "web"}],
            "prepared_dir": str(tmp / out),
            "val_fraction": 0.1,
            "unit_files": 1,
            **data_kw,
        },  # a unit per file: shards and workers get work to split
        tokenizer={"type": "char", "path": str(tmp / "tok.json")},
    )
    return load_recipe(str(path)), str(path)


def one_file_recipe(tmp: Path, **data) -> tuple[object, str]:
    (tmp / "corpus").mkdir(exist_ok=True)
    (tmp / "corpus" / "book.txt").write_bytes(BIG_TEXT.read_bytes())
    path = write_recipe(
        tmp / "r.yaml",
        tmp,
        tmp / "runs",
        data={
            "sources": [{"name": "book", "type": "text", "paths": [str(tmp / "corpus")]}],
            "prepared_dir": str(tmp / "prepared"),
            "val_fraction": 0.01,
            "seq_len": 64,
            **data,
        },
        model={"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
        train={"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 1},
    )
    return load_recipe(str(path)), str(path)


WORDS = [
    "river",
    "market",
    "winter",
    "council",
    "garden",
    "engine",
    "signal",
    "harbor",
    "pattern",
    "lantern",
    "meadow",
    "summit",
    "orchard",
    "compass",
    "timber",
    "canyon",
    "beacon",
    "glacier",
    "harvest",
    "village",
    "station",
    "journey",
    "mirror",
    "thunder",
    "silver",
    "forest",
    "the",
    "and",
    "of",
    "to",
    "with",
]


def essay(rng: random.Random, n: int = 120) -> str:
    sentences = []
    while sum(len(s.split()) for s in sentences) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def kept_for_backward(
    cfg: ModelConfig, seq: int, batch: int, mode: str, every: int, loss_chunk: int, compiled: bool = False
) -> int:
    """Bytes of the distinct storages autograd keeps after a bf16 forward with targets (parameters excluded)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(torch.bfloat16)
    apply_activation_checkpointing(model, ActivationCheckpointingConfig(mode=mode, every=every))
    if compiled:  # blocks and loss as train.compile builds them
        torch._dynamo.reset()
        compile_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, x, loss_chunk=loss_chunk)
    loss.backward()  # the graph is whole: backward runs
    return sum(kept.values())


SHAPES = [
    dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=1000),
    dict(d_model=96, n_layers=3, n_heads=6, d_ff=256, vocab_size=500, norm="layernorm", mlp="gelu", position="learned"),
]
