"""Hugging Face interop: exported LlamaForCausalLM matches llmforge's logits and greedy generation; import → export
round trip is identical; architectures Llama cannot express are refused in one line."""

from __future__ import annotations

import sys

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


@pytest.mark.parametrize("kw,key", [(dict(mlp="gelu"), "model.mlp=gelu"), (dict(norm="layernorm"), "model.norm"),
                                    (dict(position="learned"), "model.position=learned")])
def test_unsupported_architectures_are_refused(kw, key):
    model = GPT(ModelConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, **kw))
    with pytest.raises(ExportError, match=key):
        to_llama(model)


def test_export_cli_from_a_checkpoint(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs", train={"max_steps": 3, "warmup_steps": 1},
                          eval={"interval": 0}, deepspeed={"config": str(REPO / "ds_configs/zero0.json")})
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe)).returncode == 0
    r = run_cli(sys.executable, "launch/export_hf.py", "--checkpoint", str(tmp_path / "runs" / "t"),
                "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    bad = write_recipe(tmp_path / "g.yaml", prepared, tmp_path / "runs", run={"name": "g"}, model={"mlp": "gelu"},
                       train={"max_steps": 1, "warmup_steps": 1}, eval={"interval": 0},
                       deepspeed={"config": str(REPO / "ds_configs/zero0.json")})
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(bad)).returncode == 0
    r = run_cli(sys.executable, "launch/export_hf.py", "--checkpoint", str(tmp_path / "runs" / "g"),
                "--out", str(tmp_path / "hf2"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("export error: model.mlp=gelu")
    assert not (tmp_path / "hf2").exists()


def test_plot_writes_pngs(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs", train={"max_steps": 4, "warmup_steps": 1},
                          eval={"interval": 2}, deepspeed={"config": str(REPO / "ds_configs/zero0.json")})
    assert run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe)).returncode == 0
    r = run_cli("llmforge", "plot", str(tmp_path / "runs" / "t"))
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted(p.name for p in (tmp_path / "runs" / "t" / "plots").glob("*.png"))
    assert pngs == ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    assert all((tmp_path / "runs" / "t" / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
