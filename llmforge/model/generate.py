"""Sampling from a GPT: temperature, top-k, top-p (nucleus), with or without a KV cache."""

from __future__ import annotations

from typing import Optional

import torch

from llmforge.model.gpt import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick next tokens (B,) from last-position logits (B, V). temperature 0 is greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    stop_token: Optional[int] = None,
) -> torch.Tensor:
    """Extend `prompt` (B, T) by up to max_new_tokens. Past max_seq_len the context window slides (no cache)."""
    model.eval()
    limit = model.cfg.max_seq_len
    tokens = prompt
    cache = KVCache(model.cfg.n_layers) if use_cache else None
    fed = 0  # tokens of `tokens` already in the cache
    for _ in range(max_new_tokens):
        if cache is not None and tokens.shape[1] <= limit:
            logits, _ = model(tokens[:, fed:], cache=cache)
            fed = tokens.shape[1]
        else:
            logits, _ = model(tokens[:, -limit:])
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
    return tokens
