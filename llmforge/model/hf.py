"""Hugging Face interop: llmforge GPT <-> transformers `LlamaForCausalLM` (same RoPE convention, RMSNorm, SwiGLU,
grouped-query attention, optional tied embeddings). Architectures Llama cannot express are refused in one line."""

from __future__ import annotations

from typing import Any

import torch

from llmforge.config.recipe import ModelConfig
from llmforge.errors import UserError
from llmforge.model.gpt import GPT

# llmforge name pattern -> Llama name pattern ({i} = layer)
LAYER_MAP = {
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GLOBAL_MAP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


class ExportError(UserError):
    prefix = "export error"


def check_llama_compatible(cfg: ModelConfig) -> None:
    for key, value, needed in (
        ("mlp", cfg.mlp, "swiglu"),
        ("norm", cfg.norm, "rmsnorm"),
        ("position", cfg.position, "rope"),
    ):
        if value != needed:
            raise ExportError(
                f"model.{key}={value} has no LlamaForCausalLM equivalent (Llama needs {needed}); "
                f"export supports swiglu + rmsnorm + rope models"
            )


def llama_config(cfg: ModelConfig) -> Any:
    from transformers import LlamaConfig

    check_llama_compatible(cfg)
    return LlamaConfig(  # type: ignore[call-arg]  # rope_theta: accepted through **kwargs
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        dtype="float32",
    )


def _names(n_layers: int) -> list[tuple[str, str]]:
    pairs = [(k.format(i=i), v.format(i=i)) for i in range(n_layers) for k, v in LAYER_MAP.items()]
    return pairs + list(GLOBAL_MAP.items())


def to_llama(model: GPT) -> Any:
    """A transformers LlamaForCausalLM holding the same weights (fp32)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(model.cfg)).float().eval()
    ours = model.state_dict()
    theirs = {
        hf_name: ours[name].float()
        for name, hf_name in _names(model.cfg.n_layers)
        if not (name == "lm_head.weight" and model.cfg.tie_embeddings)
    }
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.cfg.tie_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def from_llama(directory: str) -> GPT:
    """An llmforge GPT from a local Hugging Face Llama-architecture model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{directory}: not a Hugging Face model directory ({e})") from None
    if config.model_type != "llama" or getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"{directory}: model_type={config.model_type}; only Llama-architecture models import")
    cfg = ModelConfig(
        vocab_size=config.vocab_size,
        max_seq_len=config.max_position_embeddings,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        d_ff=config.intermediate_size,
        rope_theta=float(getattr(config, "rope_theta", 10000.0)),
        norm_eps=config.rms_norm_eps,
        tie_embeddings=bool(config.tie_word_embeddings),
    )
    hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    theirs = hf.state_dict()
    model = GPT(cfg)
    state = {
        name: theirs[hf_name]
        for name, hf_name in _names(cfg.n_layers)
        if hf_name in theirs or not (name == "lm_head.weight" and cfg.tie_embeddings)
    }
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model.eval()
