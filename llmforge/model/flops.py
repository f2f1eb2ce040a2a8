"""Training FLOPs per token and model FLOPs utilisation (MFU)."""

from __future__ import annotations

from typing import Optional

from llmforge.config.recipe import ModelConfig

# Dense bf16/fp16 tensor-core peak, FLOP/s, by substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "A6000": 155e12,
    "4090": 165e12,
    "3090": 71e12,
    "MI300": 1307e12,
    "MI250": 362e12,
}


def flops_per_token(n_params_non_embedding: int, cfg: ModelConfig, seq_len: int) -> float:
    """6N for the weights (forward + backward) plus the attention score/value term 12·L·d·T (PaLM, appendix B).
    N counts the parameters a token uses: pass an MoE model's active ones (see inactive_params).

    N counts every weight that multiplies per token, the LM head included: an untied head is a non-embedding
    parameter already; a head tied to the token embedding is not, so its d·V is added here (the embedding lookup
    itself costs nothing). Tied and untied models of the same shape then do the same FLOPs, as they should."""
    head = cfg.d_model * cfg.vocab_size if cfg.tie_embeddings and cfg.vocab_size else 0
    return 6.0 * (n_params_non_embedding + head) + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use: in each MoE block, the routed experts beyond its top_k (each a SwiGLU of
    3 · d_model · expert width weights). 0 for a dense model. FLOPs and MFU count parameters minus these."""
    m = cfg.moe
    if not m.enabled:
        return 0
    return len(cfg.moe_layers) * (m.num_experts - m.top_k) * 3 * cfg.d_model * cfg.expert_ff


def device_peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Peak FLOP/s of a known accelerator, or None (CPU, unknown) so MFU is reported as null."""
    if not device_name:
        return None
    for key, peak in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return peak
    return None
