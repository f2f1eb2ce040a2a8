"""A decoder-only transformer in one file: embeddings → pre-norm blocks (attention + MLP) → final norm → LM head.

Blocks hold `attn_norm, attn, mlp_norm` and either `mlp` (dense) or `moe` (a mixture of experts: a router `gate` and
stacked SwiGLU experts, Mixtral's routing; its auxiliary losses come back beside the block's output). Attention is
causal with grouped-query heads, via `scaled_dot_product_attention` or an explicit mask + softmax reference path.
Positions are rotary (RoPE, the half-split convention used by Llama) or learned. DeepSpeed, activation checkpointing
and parallelism live elsewhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmforge.config.recipe import ModelConfig

IGNORE_INDEX = -100  # a target that carries no loss (prompt and padding positions; PyTorch's default ignore_index)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, start: int = 0, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim // 2) for positions start..start+seq_len-1, computed in fp32: one
    angle per pair of dimensions (i, i + head_dim // 2), the rotate-half layout of Llama and HF."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def rope_tables_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, head_dim // 2) for per-token positions (B, T): positions that restart at each
    document of a packed window (`document_positions`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def document_ids(idx: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) index of the document each token belongs to in a packed window: documents end with EOS, which belongs
    to the document it ends; the window's first token opens document 0."""
    eos = (idx == eos_id).long()
    return eos.cumsum(dim=1) - eos


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its document (0 at each document's first token), as Megatron's
    --reset-position-ids gives."""
    T = documents.shape[1]
    arange = torch.arange(T, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return arange - torch.where(starts, arange, torch.zeros_like(arange)).cummax(dim=1).values


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, D) by position, in fp32; cos/sin are (T, D/2). Each pair (x1, x2) = (x[i],
    x[i + D/2]) becomes (x1·cos − x2·sin, x2·cos + x1·sin), i.e. x·cos + rotate_half(x)·sin over full-width tables.
    x is upcast once, so the gradient is summed in fp32 and rounded to x's dtype once."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding."""

    def __init__(self, n_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Projections, RoPE and the KV cache around `core`. Head counts are read off the projections' outputs, so the
    same code runs on a tensor-parallel shard that holds a subset of the heads (model/parallel.py)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.core = CoreAttention(cfg.attn_impl, cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
        documents: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.core(q, k, v, documents)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class CoreAttention(nn.Module):
    """Causal attention of (B, heads, T, head_dim) queries over keys and values with as many or fewer heads
    (grouped-query) and as many or more positions (a cache's past tokens first). A module of its own so that
    sequence parallelism can run it on every token of a subset of the heads (model/parallel.py)."""

    def __init__(self, impl: str, dropout: float):
        super().__init__()
        self.impl, self.dropout = impl, dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """`documents` (B, T): each query attends only to earlier keys of its own document (no cache then)."""
        T, past = q.shape[2], k.shape[2] - q.shape[2]
        dropout = self.dropout if self.training else 0.0
        if documents is not None:
            if past:
                raise ValueError("document-masked attention takes no KV cache (generation sees one document)")
            if self.impl != "sdpa":
                return reference_attention(q, k, v, 0, dropout, documents)
            return document_attention(q, k, v, documents, dropout)
        if self.impl != "sdpa":
            return reference_attention(q, k, v, past, dropout)
        # With a cache and several new tokens the causal mask is offset by `past`; otherwise is_causal does it.
        mask = _causal_mask(T, past, q.device) if past and T > 1 else None
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None and T > 1,
            enable_gqa=k.shape[1] != q.shape[1],
        )


def _causal_mask(T: int, past: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, past+T): query i may attend keys 0..past+i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention within each document of packed windows. On CPU, causal SDPA run on each document's slice
    (exact, and faster than a masked SDPA over the window: docs/training.md has the measurements); on CUDA,
    flex_attention (compiled) with a block mask of same-document, earlier-or-equal keys, which skips the blocks of
    other documents; elsewhere, or with attention dropout (flex_attention has none), SDPA with the boolean (B, 1, T, T)
    mask."""
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cuda" and dropout == 0.0:
        return flex_document_attention(q, k, v, documents, compiled=True)
    if q.device.type != "cpu":
        same = documents[:, None, :, None] == documents[:, None, None, :]
        mask = same & _causal_mask(q.shape[2], 0, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
    rows = []
    for b in range(q.shape[0]):
        _, counts = torch.unique_consecutive(documents[b], return_counts=True)
        pieces, start = [], 0
        for n in counts.tolist():
            s = slice(start, start + n)
            qs, ks, vs = q[b : b + 1, :, s], k[b : b + 1, :, s], v[b : b + 1, :, s]
            pieces.append(
                F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=n > 1, enable_gqa=gqa)
            )
            start += n
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


_block_masks: list[tuple[torch.Tensor, Any]] = []  # the last micro-batch's (documents, block mask): one per forward


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, compiled: bool = True
) -> torch.Tensor:
    """document_attention through flex_attention. The block mask is built once per `documents` tensor (every layer of
    a forward, and its recomputation under activation checkpointing, pass the same one). `compiled` False runs
    flex_attention eagerly: on CPU its forward only (its backward is not implemented there), for tests."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not _block_masks or _block_masks[0][0] is not documents:

        def same_document(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (documents[b, q_idx] == documents[b, kv_idx]) & (q_idx >= kv_idx)

        T = q.shape[2]
        block = create_block_mask(
            same_document, B=q.shape[0], H=None, Q_LEN=T, KV_LEN=T, device=q.device, _compile=compiled
        )
        _block_masks[:] = [(documents, block)]
    attend: Any = _compiled_flex_attention() if compiled else flex_attention
    return attend(q, k, v, block_mask=_block_masks[0][1], enable_gqa=k.shape[1] != q.shape[1])


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past: int = 0,
    dropout: float = 0.0,
    documents: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain causal attention (explicit mask + softmax) with grouped-query heads; the spec the SDPA path must meet.
    `documents` (B, T): keys of other documents are masked too."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = _causal_mask(q.shape[2], past, q.device)
    if documents is not None:
        mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    probs = F.dropout(probs, p=dropout)
    return (probs @ v.float()).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: Optional[int] = None):
        super().__init__()
        self.kind, ff = cfg.mlp, width or cfg.ff_dim
        if cfg.mlp == "swiglu":
            self.gate = nn.Linear(cfg.d_model, ff, bias=False)
        self.up = nn.Linear(cfg.d_model, ff, bias=False)
        self.down = nn.Linear(ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class RouterOutput(NamedTuple):
    """What an MoE block reports beside its output: the auxiliary loss it adds to the training objective, and
    detached measurements for the metrics."""

    loss: torch.Tensor  # aux_loss_weight · balance + router_z_loss_weight · z (carries gradient to the router)
    balance: torch.Tensor  # load-balancing loss: num_experts · sum_e (assignments to e / tokens) · mean prob of e
    z: torch.Tensor  # router z-loss: mean over tokens of logsumexp(router logits)²
    load: torch.Tensor  # (num_experts,) token assignments each expert was chosen for (before any capacity drop)
    dropped: torch.Tensor  # assignments dropped by the capacity limit (0 when dropless)
    layer: int  # the block's index


def router_output(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    aux_weight: float,
    z_weight: float,
    layer: int,
    dropped: Optional[torch.Tensor] = None,
    probs: Optional[torch.Tensor] = None,
) -> RouterOutput:
    """An MoE block's RouterOutput from its router's fp32 logits (tokens, experts) and each token's chosen experts
    (tokens, top_k): the load-balancing loss num_experts · sum_e (assignments to e / tokens) · mean probability of e
    (Switch; Mixtral's form for top-k, top_k at perfect balance) and the z-loss mean(logsumexp(logits)²) (ST-MoE)."""
    n, E = logits.shape
    load = torch.bincount(chosen.reshape(-1), minlength=E)
    probs = logits.softmax(dim=-1) if probs is None else probs  # the caller's, when it routed with them
    balance = E * (load.float() / n * probs.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return RouterOutput(
        aux_weight * balance + z_weight * z,
        balance.detach(),
        z.detach(),
        load.detach(),
        load.new_zeros(()) if dropped is None else dropped,
        layer,
    )


def grouped_mm_runs(x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes x: on CPU in fp32 and bf16; on CUDA bf16 on compute capability >= 8.0
    (its documented requirement). Elsewhere the experts loop."""
    if x.device.type == "cpu":
        return True
    return (
        x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


class Experts(nn.Module):
    """`n` SwiGLU MLPs stored stacked, Mixtral's names per expert: w1 (gate) and w3 (up) of shape (n, ff, d_model), w2
    (down) of shape (n, d_model, ff). `forward` takes tokens already sorted by expert and each expert's count."""

    def __init__(self, n: int, d_model: int, ff: int, impl: str):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n, ff, d_model))
        self.w3 = nn.Parameter(torch.empty(n, ff, d_model))
        self.w2 = nn.Parameter(torch.empty(n, d_model, ff))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.impl == "grouped" and grouped_mm_runs(x):
            # One grouped GEMM per projection: rows offs[e-1]..offs[e] of x go through expert e.
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(F.grouped_mm(x, self.w1.transpose(1, 2), offs=offs))
            h = h * F.grouped_mm(x, self.w3.transpose(1, 2), offs=offs)
            return F.grouped_mm(h, self.w2.transpose(1, 2), offs=offs)
        outs = []
        for e, xe in enumerate(torch.split(x, counts.tolist())):  # the reference: one matmul per expert
            outs.append((F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)) @ self.w2[e].T)
        return torch.cat(outs)


class MoE(nn.Module):
    """A sparse MLP (Mixtral's routing): the router `gate` (no bias) scores the experts, a softmax over all of them
    in fp32 picks each token's top_k, whose weights are renormalised to sum to 1; the token's output is the weighted
    sum of those experts' outputs, plus the shared experts' (every token, unweighted) when there are any. With a
    capacity factor each expert takes at most ceil(c · tokens · top_k / num_experts) assignments of the call, first
    choices of every token before second choices (GShard's priority), in token order; a dropped assignment adds
    nothing. Returns (output, RouterOutput)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.moe
        self.layer = layer
        self.num_experts, self.top_k, self.capacity_factor = m.num_experts, m.top_k, m.capacity_factor
        self.aux_weight, self.z_weight = m.aux_loss_weight, m.router_z_loss_weight
        self.gate = nn.Linear(cfg.d_model, m.num_experts, bias=False)
        self.experts = Experts(m.num_experts, cfg.d_model, cfg.expert_ff, m.impl)
        self.shared = MLP(cfg, m.shared_experts * cfg.expert_ff) if m.shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape, E, k = x.shape, self.num_experts, self.top_k
        h = x.reshape(-1, shape[-1])
        n = h.shape[0]
        logits = self.gate(h).float()
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(k, dim=-1)  # (n, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # Assignments in priority order: every token's first choice, then every token's second, ...
        expert = chosen.T.reshape(-1)
        token = torch.arange(n, device=h.device).repeat(k)
        weight = weights.T.reshape(-1)
        dropped = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n * k / E)
            onehot = F.one_hot(expert, E)
            place = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # 0-based position in its expert's queue
            kept = place < capacity
            dropped = (~kept).sum()
            expert, token, weight = expert[kept], token[kept], weight[kept]
        order = torch.argsort(expert, stable=True)  # group by expert, keeping priority order within each
        token, weight = token[order], weight[order]
        counts = torch.bincount(expert, minlength=E)
        y = self.experts(h[token], counts)
        out = torch.zeros_like(h, dtype=torch.float32).index_add_(0, token, y.float() * weight[:, None])
        out = out.to(h.dtype)
        if self.shared is not None:
            out = out + self.shared(h)
        aux = router_output(logits, chosen, self.aux_weight, self.z_weight, self.layer, dropped, probs)
        return out.view(shape), aux


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(attn_norm(x)), then + mlp(mlp_norm(x)) (or + moe(mlp_norm(x)) in an MoE
    block). Returns (x, the MoE block's RouterOutput or None)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        sparse = layer in cfg.moe_layers
        self.mlp = None if sparse else MLP(cfg)
        self.moe = MoE(cfg, layer) if sparse else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
        documents: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[RouterOutput]]:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, cache, documents))
        if self.moe is None:
            assert self.mlp is not None
            return x + self.dropout(self.mlp(self.mlp_norm(x))), None
        y, router = self.moe(self.mlp_norm(x))
        return x + self.dropout(y), router


class TokenLoss(nn.Module):
    """Summed fp32 cross-entropy over the targets that are not IGNORE_INDEX, and the summed squared log-partition (for
    PaLM's z-loss), of (N, vocab) logits. A module of its own so that `train.compile` can compile it: compiled, the
    fp32 upcast, log-sum-exp and gather fuse into one pass and backward keeps only the 16-bit logits and one fp32
    log-sum-exp per token, where eager keeps the fp32 log-softmax (N × vocab × 4 bytes)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, with_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        z = torch.logsumexp(logits, dim=-1).pow(2).sum() if with_z else logits.new_zeros(())
        return ce, z


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None or cfg.max_seq_len is None:
            raise ValueError("ModelConfig.vocab_size and max_seq_len must be resolved before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.loss = TokenLoss()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2·n_layers)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.wo.weight, mean=0.0, std=residual_std)
            if block.mlp is not None:
                nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)
            else:
                assert block.moe is not None
                nn.init.normal_(block.moe.experts.w1, mean=0.0, std=std)
                nn.init.normal_(block.moe.experts.w3, mean=0.0, std=std)
                nn.init.normal_(block.moe.experts.w2, mean=0.0, std=residual_std)
                if block.moe.shared is not None:
                    nn.init.normal_(block.moe.shared.down.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        loss_chunk: int = 0,
        z_loss: float = 0.0,
        offset: int = 0,
        totals: Optional[tuple[torch.Tensor, int]] = None,
        router: Optional[list[RouterOutput]] = None,
        documents: Optional[torch.Tensor] = None,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Logits (B, T, vocab) and, given targets, the loss: mean next-token cross-entropy in fp32 over targets that
        are not IGNORE_INDEX, plus z_loss × the mean squared log-partition (PaLM's z-loss) when z_loss > 0.

        The loss is the language-modelling loss only: MoE blocks append their RouterOutput (auxiliary losses, expert
        load) to `router` when a list is given, and a training objective adds their `loss` (train/trainer.py).

        loss_chunk > 0 (with targets): the LM head and loss run over that many tokens at a time, each chunk's logits
        recomputed in the backward pass, so the (tokens × vocab) logits are never held whole; logits come back None.

        Sequence parallelism gives one slice of longer sequences: `offset` is the position of idx[:, 0], and `totals`
        (targets that carry loss, positions) of the whole sequences divide the slice's summed loss, so the slices'
        losses add up to the whole sequences' mean.

        `documents` (B, T of the whole sequences; `document_ids`): document-masked attention, each token attending
        only to earlier tokens of its own document, and positions restarting at each document.
        """
        B, T = idx.shape
        start = (cache.length if cache is not None else 0) + offset
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(idx)
        rope = None
        if documents is not None:
            if cache is not None:
                raise ValueError("document masking takes no KV cache")
            positions = document_positions(documents)[:, offset : offset + T]
            if self.pos_emb is not None:
                x = x + self.pos_emb(positions)
            else:
                rope = rope_tables_at(positions, self.cfg.head_dim, self.cfg.rope_theta)
        elif self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, start, idx.device)
        x = self.drop(x)
        for block in self.blocks:
            x, routed = block(x, rope, cache, documents)
            if routed is not None and router is not None:
                router.append(routed)
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h), None
        return self.head_loss(h, targets, loss_chunk, z_loss, totals)

    def head_loss(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        loss_chunk: int = 0,
        z_loss: float = 0.0,
        totals: Optional[tuple[torch.Tensor, int]] = None,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The LM head and loss over final hidden states h (..., d_model) and their targets (...): (logits or None
        when chunked, loss), as GPT.forward returns them."""
        chunked = 0 < loss_chunk < targets.numel()
        logits = None if chunked else self.lm_head(h)  # returned as computed: callers may differentiate by it
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        n = h.shape[0]
        if chunked:
            ce = z = 0.0
            for s in range(0, n, loss_chunk):
                args = (h[s : s + loss_chunk], targets[s : s + loss_chunk], bool(z_loss))
                if torch.is_grad_enabled():
                    # Non-reentrant: the recomputation calls lm_head as a module again (ZeRO-3 gathers its weight).
                    chunk_ce, chunk_z = checkpoint(self._chunk_loss, *args, use_reentrant=False)
                else:
                    chunk_ce, chunk_z = self._chunk_loss(*args)
                ce, z = ce + chunk_ce, z + chunk_z
        else:
            ce, z = self.loss(logits.view(n, -1), targets, bool(z_loss))
        counted, positions = totals if totals is not None else ((targets != IGNORE_INDEX).sum(), n)
        loss = ce / counted
        return logits, loss + z_loss * z / positions if z_loss else loss

    def _chunk_loss(self, h: torch.Tensor, targets: torch.Tensor, with_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(self.lm_head(h), targets, with_z)

    def num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Parameters (without the embeddings when non_embedding); `active`: those one token uses (an MoE block's
        top_k of its routed experts)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.modules():
                if isinstance(moe, MoE):
                    per_expert = sum(p[0].numel() for p in moe.experts.parameters())
                    n -= per_expert * (moe.num_experts - moe.top_k)
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n
