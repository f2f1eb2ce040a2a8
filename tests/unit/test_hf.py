"""Hugging Face interop: exported LlamaForCausalLM matches llmforge's logits and greedy generation; import → export
round trip is identical; architectures Llama cannot express are refused in one line."""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig

import pytest
import torch

from llmforge.config.recipe import ModelConfig
from llmforge.model import GPT, generate
from llmforge.model.hf import ExportError, from_llama, to_llama
from tests.conftest import REPO, run_cli, write_recipe


@pytest.mark.parametrize("kw", [dict(n_kv_heads=2, tie_embeddings=True), dict(n_kv_heads=4, tie_embeddings=False)])
def test_llama_logits_generation_and_round_trip(tmp_path, kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, max_seq_len=64, d_model=64, n_layers=3, n_heads=4, **kw)).eval()
    hf = to_llama(model)
    out = tmp_path / "hf"
    hf.save_pretrained(out)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        diff = (model(x)[0] - loaded(x).logits).abs().max().item()
    assert diff < 1e-4
    prompt = x[:1, :5]
    ours = generate(model, prompt, 20, temperature=0)
    theirs = loaded.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    back = from_llama(str(out))
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    to_llama(back).save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(mlp="gelu"), "model.mlp=gelu"),
        (dict(norm="layernorm"), "model.norm"),
        (dict(position="learned"), "model.position=learned"),
    ],
)
def test_unsupported_architectures_are_refused(kw, key):
    model = GPT(ModelConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, **kw))
    with pytest.raises(ExportError, match=key):
        to_llama(model)


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


def test_plot_writes_pngs(tmp_path, prepared):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        prepared,
        tmp_path / "runs",
        train={"max_steps": 4, "warmup_steps": 1},
        eval={"interval": 2},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe)).returncode == 0
    r = run_cli("llmforge", "plot", str(tmp_path / "runs" / "t"))
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p.name for p in (tmp_path / "runs" / "t" / "plots").glob("*.png"))
    assert pngs == ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    assert all((tmp_path / "runs" / "t" / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def _stdlib_texts(start: int, stop: int) -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[start:stop]
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


EDGE_CASES = [
    "h\u00e9llo w\u00f6rld 12345 \u65e5\u672c\u8a9e \U0001f600  two  spaces\n\n\ttab",
    " leading space",
    "\nleading newline",
    "trailing  ",
    "",
    "x",
    "\u0000\u00ad\ufeff odd code points",
]


@pytest.mark.parametrize("kind", ["sentencepiece", "char"])
def test_tokenizer_export_encodes_and_decodes_like_llmforge(tmp_path, kind):
    """AutoTokenizer on the exported files gives llmforge's ids and text back, on held-out real text (code, prose,
    unicode that only byte fallback or <unk> covers, leading and repeated whitespace)."""
    from transformers import AutoTokenizer

    from llmforge.tokenizer.char import CharTokenizer
    from llmforge.tokenizer.export import save_hf_tokenizer
    from llmforge.tokenizer.sentencepiece import SentencePieceTokenizer

    train = _stdlib_texts(0, 40)
    if kind == "sentencepiece":
        tok = SentencePieceTokenizer.train(train, 1500, str(tmp_path / "spm.model"))
    else:
        tok = CharTokenizer.train(train)
    save_hf_tokenizer(tok, str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    texts = _stdlib_texts(40, 120) + EDGE_CASES
    tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), text[:80]
        tokens += len(ids)
    assert tokens > 100_000


def test_import_hf_then_export_is_identical(tmp_path):
    """HF Llama dir -> `llmforge import-hf` (a run with a committed checkpoint) -> export-hf: same tensors, same
    tokenizer; the imported run generates like any other."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from llmforge.tokenizer.char import CharTokenizer
    from llmforge.tokenizer.export import save_hf_tokenizer

    tok = CharTokenizer.train(_stdlib_texts(0, 5))
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
    to_llama(model).save_pretrained(src)
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
