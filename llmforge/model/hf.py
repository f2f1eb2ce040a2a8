"""Hugging Face interop: llmforge GPT <-> transformers `LlamaForCausalLM` (same RoPE convention, RMSNorm, SwiGLU,
grouped-query attention, optional tied embeddings), and a model whose every block is a mixture of experts <->
`MixtralForCausalLM` (the same routing: softmax, top-k, renormalised). transformers keeps Mixtral's experts fused
in memory (gate_up_proj, down_proj) and writes the per-expert names of Mixtral's files
(`block_sparse_moe.experts.{e}.w1/w2/w3`) on save. Architectures neither can express are refused in one line."""

from __future__ import annotations

from typing import Any

import torch

from llmforge.config.recipe import ModelConfig, MoEConfig
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


def check_mixtral_compatible(cfg: ModelConfig) -> None:
    """An MoE model exports as Mixtral when every block routes, without shared experts or a capacity limit."""
    m = cfg.moe
    for problem, hint in (
        (
            len(cfg.moe_layers) != cfg.n_layers,
            f"MoE blocks {cfg.moe_layers} of {cfg.n_layers}: Mixtral routes in every block",
        ),
        (m.shared_experts > 0, f"model.moe.shared_experts={m.shared_experts}: Mixtral has none"),
        (m.capacity_factor is not None, f"model.moe.capacity_factor={m.capacity_factor}: Mixtral drops no tokens"),
    ):
        if problem:
            raise ExportError(f"{hint}; export writes MixtralForCausalLM, which cannot express it")


def _shared_config(cfg: ModelConfig, intermediate_size: int) -> dict:
    """The config fields Llama and Mixtral share (their attention, norms, positions and embeddings are the same)."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        dtype="float32",
    )


def mixtral_config(cfg: ModelConfig) -> Any:
    from transformers import MixtralConfig

    check_llama_compatible(cfg)
    check_mixtral_compatible(cfg)
    m = cfg.moe
    return MixtralConfig(
        **_shared_config(cfg, cfg.expert_ff),
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.aux_loss_weight,
        router_jitter_noise=0.0,
    )


def llama_config(cfg: ModelConfig) -> Any:
    from transformers import LlamaConfig

    check_llama_compatible(cfg)
    return LlamaConfig(**_shared_config(cfg, cfg.ff_dim), attention_bias=False, mlp_bias=False)


def _names(n_layers: int) -> list[tuple[str, str]]:
    pairs = [(k.format(i=i), v.format(i=i)) for i in range(n_layers) for k, v in LAYER_MAP.items()]
    return pairs + list(GLOBAL_MAP.items())


def _mixtral_names(n_layers: int) -> list[tuple[str, str]]:
    """Every name but the experts': attention, norms, the router, embeddings and head."""
    dense = {k: v for k, v in LAYER_MAP.items() if ".mlp." not in k}
    dense["blocks.{i}.moe.gate.weight"] = "model.layers.{i}.mlp.gate.weight"
    pairs = [(k.format(i=i), v.format(i=i)) for i in range(n_layers) for k, v in dense.items()]
    return pairs + list(GLOBAL_MAP.items())


def to_hf(model: GPT) -> Any:
    """A transformers LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) holding the same weights (fp32)."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    cfg = model.cfg
    ours = model.state_dict()
    if cfg.moe.enabled:
        hf = MixtralForCausalLM(mixtral_config(cfg)).float().eval()
        names = _mixtral_names(cfg.n_layers)
        theirs = {}
        for i in range(cfg.n_layers):
            w = f"blocks.{i}.moe.experts."
            fused = torch.cat([ours[w + "w1"], ours[w + "w3"]], dim=1)  # gate rows, then up rows
            theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"] = fused.float()
            theirs[f"model.layers.{i}.mlp.experts.down_proj"] = ours[w + "w2"].float()
    else:
        hf = LlamaForCausalLM(llama_config(cfg)).float().eval()
        names, theirs = _names(cfg.n_layers), {}
    theirs.update(
        {
            hf_name: ours[name].float()
            for name, hf_name in names
            if not (name == "lm_head.weight" and cfg.tie_embeddings)
        }
    )
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.cfg.tie_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def from_hf(directory: str) -> GPT:
    """An llmforge GPT from a local Hugging Face Llama- or Mixtral-architecture model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{directory}: not a Hugging Face model directory ({e})") from None
    if config.model_type not in ("llama", "mixtral") or getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(
            f"{directory}: model_type={config.model_type}; only Llama- and Mixtral-architecture models import"
        )
    mixtral = config.model_type == "mixtral"
    moe = (
        MoEConfig(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            aux_loss_weight=float(config.router_aux_loss_coef),
        )
        if mixtral
        else MoEConfig()
    )
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
        moe=moe,
    )
    hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    theirs = hf.state_dict()
    model = GPT(cfg)
    names = _mixtral_names(cfg.n_layers) if mixtral else _names(cfg.n_layers)
    state = {
        name: theirs[hf_name]
        for name, hf_name in names
        if hf_name in theirs or not (name == "lm_head.weight" and cfg.tie_embeddings)
    }
    if mixtral:
        for i in range(cfg.n_layers):
            w1, w3 = theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
            state[f"blocks.{i}.moe.experts.w1"], state[f"blocks.{i}.moe.experts.w3"] = w1, w3
            state[f"blocks.{i}.moe.experts.w2"] = theirs[f"model.layers.{i}.mlp.experts.down_proj"]
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model.eval()
