"""Hugging Face interop: exported LlamaForCausalLM (dense) and MixtralForCausalLM (MoE) match llmforge's logits and
greedy generation; import → export round trip is identical; architectures neither can express are refused in one
line."""

from __future__ import annotations

import pytest
import torch

from llmforge.config.recipe import ModelConfig, MoEConfig
from llmforge.model import GPT, generate
from llmforge.model.hf import ExportError, from_hf, to_hf
from tests.helpers import stdlib_texts

MIXTRAL = dict(n_kv_heads=2, tie_embeddings=False, moe=MoEConfig(num_experts=4, top_k=2, d_ff=48))


@pytest.mark.parametrize(
    "kw", [dict(n_kv_heads=2, tie_embeddings=True), dict(n_kv_heads=4, tie_embeddings=False), MIXTRAL]
)
def test_llama_and_mixtral_logits_generation_and_round_trip(tmp_path, kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, max_seq_len=64, d_model=64, n_layers=3, n_heads=4, **kw)).eval()
    hf = to_hf(model)
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
    back = from_hf(str(out))
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    to_hf(back).save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    if "moe" in kw:  # Mixtral's names in the file, one tensor per expert and projection
        assert type(loaded).__name__ == "MixtralForCausalLM"
        for e in range(4):
            for w, shape in (("w1", (48, 64)), ("w3", (48, 64)), ("w2", (64, 48))):
                key = f"model.layers.2.block_sparse_moe.experts.{e}.{w}.weight"
                assert first[key].shape == shape
                ours = model.state_dict()[f"blocks.2.moe.experts.{w}"][e]
                assert torch.equal(first[key], ours), key
        assert torch.equal(first["model.layers.0.block_sparse_moe.gate.weight"], model.blocks[0].moe.gate.weight)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(mlp="gelu"), "model.mlp=gelu"),
        (dict(norm="layernorm"), "model.norm"),
        (dict(position="learned"), "model.position=learned"),
        (dict(moe=MoEConfig(num_experts=4, every=2)), r"MoE blocks \[0\] of 2"),
        (dict(moe=MoEConfig(num_experts=4, shared_experts=1)), "shared_experts=1"),
        (dict(moe=MoEConfig(num_experts=4, capacity_factor=1.25)), "capacity_factor=1.25"),
    ],
)
def test_unsupported_architectures_are_refused(kw, key):
    model = GPT(ModelConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, **kw))
    with pytest.raises(ExportError, match=key):
        to_hf(model)


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

    train = stdlib_texts(0, 40)
    if kind == "sentencepiece":
        tok = SentencePieceTokenizer.train(train, 1500, str(tmp_path / "spm.model"))
    else:
        tok = CharTokenizer.train(train)
    save_hf_tokenizer(tok, str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    texts = stdlib_texts(40, 120) + EDGE_CASES
    tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), text[:80]
        tokens += len(ids)
    assert tokens > 100_000
