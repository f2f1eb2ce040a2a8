"""Hugging Face and plot commands on real runs: export a checkpoint, import a Llama directory and export it back."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmforge.config.recipe import ModelConfig
from llmforge.model import GPT
from llmforge.model.hf import to_hf
from tests.helpers import REPO, run_cli, stdlib_texts, train_rows, write_recipe


def test_export_cli_from_a_checkpoint(tmp_path, prepared):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 3, "warmup_steps": 1},
        eval={"interval": 0},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe)).returncode == 0
    r = run_cli(
        sys.executable,
        "launch/export_hf.py",
        "--checkpoint",
        str(tmp_path / "runs" / "t"),
        "--out",
        str(tmp_path / "hf"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    from transformers import AutoTokenizer

    from llmforge.tokenizer import tokenizer_from_json

    ours = tokenizer_from_json(json.loads((prepared / "prepared" / "tokenizer.json").read_text()))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = (prepared / "corpus").glob("*.txt").__next__().read_text()[:3000]
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id
    bad = write_recipe(
        tmp_path / "g.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": "g"},
        model={"mlp": "gelu"},
        train={"max_steps": 1, "warmup_steps": 1},
        eval={"interval": 0},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(bad)).returncode == 0
    r = run_cli(
        sys.executable,
        "launch/export_hf.py",
        "--checkpoint",
        str(tmp_path / "runs" / "g"),
        "--out",
        str(tmp_path / "hf2"),
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("export error: model.mlp=gelu")
    assert not (tmp_path / "hf2").exists()


def test_an_moe_run_logs_its_routers_plots_them_and_refuses_a_mixtral_export_it_cannot_be(tmp_path, prepared):
    """A model with one MoE block (of 2): every train row has the router metrics and loss = lm_loss + aux_loss;
    `llmforge plot` adds the router and expert-load charts; export-hf refuses it in one line (Mixtral routes in
    every block) and writes nothing; SFT from it trains with the auxiliary losses, DPO refuses it."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        model={"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "moe": {"num_experts": 4, "layers": [1]}},
        train={"max_steps": 4, "warmup_steps": 1},
        eval={"interval": 2},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "active per token" in r.stderr
    train = train_rows(tmp_path / "runs" / "t")
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    for x in train:
        assert abs(x["loss"] - (x["lm_loss"] + x["aux_loss"])) < 1e-5, x
        assert x["balance_loss"] > 0 and x["router_z_loss"] > 0 and x["dropped"] == 0.0
        assert x["expert_load_max.1"] >= 1.0 >= x["expert_load_min.1"] and "expert_load_max.0" not in x
    r = run_cli("llmforge", "plot", str(tmp_path / "runs" / "t"))
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p.name for p in (tmp_path / "runs" / "t" / "plots").glob("*.png"))
    assert pngs == ["expert_load.png", "grad_norm.png", "loss.png", "lr.png", "router.png", "tokens_per_s.png"]
    assert all((tmp_path / "runs" / "t" / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    r = run_cli(sys.executable, "launch/export_hf.py", "--checkpoint", str(tmp_path / "runs" / "t"), "--out",
                str(tmp_path / "hf"))  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("export error: MoE blocks [1] of 2")
    assert not (tmp_path / "hf").exists()

    # SFT fine-tunes the MoE model with its auxiliary losses (the experts and the router train); DPO refuses it in
    # one line and writes nothing.
    from llmforge.demo.toy_chat import preference_records, sft_records, write_jsonl
    from llmforge.train.loading import load_model

    post = {
        "train": {"max_steps": 4, "warmup_steps": 1, "init_from": str(tmp_path / "runs" / "t")},
        "data": {"seq_len": 48},
        "eval": {"interval": 0},
        "deepspeed": {"config": str(REPO / "ds_configs/zero1.json")},
    }
    chats = write_jsonl(str(tmp_path / "sft.jsonl"), sft_records(64, 1))
    sft = write_recipe(
        tmp_path / "sft.yaml", prepared, tmp_path / "runs", run={"name": "sft"}, posttrain={"train_file": chats}, **post
    )
    r = run_cli(sys.executable, "launch/sft.py", "--recipe", str(sft))
    assert r.returncode == 0, r.stderr[-3000:]
    tuned = train_rows(tmp_path / "runs" / "sft")
    assert [x["step"] for x in tuned] == [1, 2, 3, 4]
    assert all(abs(x["loss"] - (x["lm_loss"] + x["aux_loss"])) < 1e-5 and x["balance_loss"] > 0 for x in tuned)
    before = load_model(str(tmp_path / "runs" / "t"))[0].state_dict()
    after = load_model(str(tmp_path / "runs" / "sft"))[0].state_dict()
    for name in ("blocks.1.moe.gate.weight", "blocks.1.moe.experts.w1", "blocks.1.moe.experts.w2"):
        assert not torch.equal(before[name], after[name]), name
    # DPO's refusal, in-process (the exit-2 path of a RecipeError is the launchers' own, tested elsewhere)
    from llmforge.config import load_recipe
    from llmforge.errors import RecipeError
    from llmforge.posttrain.task import DPO
    from llmforge.train.checkpoint import ResumePoint

    pairs = write_jsonl(str(tmp_path / "p.jsonl"), preference_records(16, 1))
    dpo = write_recipe(
        tmp_path / "dpo.yaml", prepared, tmp_path / "runs", run={"name": "dpo"}, posttrain={"train_file": pairs}, **post
    )
    with pytest.raises(RecipeError, match="is a mixture-of-experts model: DPO does not train one yet"):
        DPO().setup(load_recipe(str(dpo)), str(dpo), ResumePoint(None), 1)
    assert not (tmp_path / "runs" / "dpo").exists()


def test_import_hf_then_export_is_identical(tmp_path):
    """HF Llama dir -> `llmforge import-hf` (a run with a committed checkpoint) -> export-hf: same tensors, same
    tokenizer; the imported run generates like any other."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from llmforge.tokenizer.char import CharTokenizer
    from llmforge.tokenizer.export import save_hf_tokenizer

    tok = CharTokenizer.train(stdlib_texts(0, 5))
    torch.manual_seed(1)
    model = GPT(
        ModelConfig(
            vocab_size=tok.vocab_size,
            max_seq_len=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            tie_embeddings=False,
        )
    )
    src = tmp_path / "src"
    to_hf(model).save_pretrained(src)
    save_hf_tokenizer(tok, str(src))
    r = run_cli(sys.executable, "-m", "llmforge.cli", "import-hf", "--hf", str(src), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000000" / "manifest.json").exists()
    r = run_cli(
        sys.executable, "launch/export_hf.py", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "back")
    )
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    text = "def main():\n    return 0\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "back").encode(text, add_special_tokens=False) == tok.encode(text)
    r = run_cli(
        sys.executable,
        "-m",
        "llmforge.cli",
        "generate",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
    )
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr[-2000:]
    bad = run_cli(
        sys.executable, "-m", "llmforge.cli", "import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "x")
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("export error:")


def test_generate_and_export_bad_paths_are_one_line_naming_the_flag(tmp_path):
    """A folder that is not a run, and an --out that is a file: one line each, exit 2, the right flag named."""
    (tmp_path / "notes.txt").write_text("not a model directory")
    r = run_cli(sys.executable, "launch/generate.py", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"checkpoint error: --checkpoint {tmp_path}: not a checkpoint, checkpoints directory or run directory"
    ]
    r = run_cli(
        sys.executable, "launch/export_hf.py", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "notes.txt")
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"export error: --out {tmp_path / 'notes.txt'}: is a file; give a directory (new, or one to write the model "
        "files into)"
    ]
