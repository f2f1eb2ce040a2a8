"""Tensor and sequence parallelism for the GPT, applied from model/wraps.py; gpt.py knows nothing of either.

Tensor parallelism is DeepSpeed's AutoTP: the composed DeepSpeed config names which Linear layers it shards
(config/parallel.py) and the engine replaces them at `deepspeed.initialize`. Column-parallel (output rows
split): wq, wk, wv, gate, up; row-parallel (input columns split, outputs all-reduced): wo, down. A rank holds whole
heads (the layout check requires n_heads and n_kv_heads divisible by the tensor size), and attention reads its head
counts off the shards. The token embedding, the final norm and the LM head stay replicated: AutoTP can split the
head only by gathering the logits again, which saves nothing in activations, and its vocabulary-parallel path
(a no-gather head with its own cross-entropy) does not cover llmforge's chunked loss or z-loss. docs/training.md
measures what the replicated vocabulary costs.

Sequence parallelism is Ulysses: each rank of a sequence group holds seq_len ÷ sequence tokens of the same samples;
attention goes through DeepSpeed's `DistributedAttention` (all-to-all from sequence to heads, attention over every
token of heads ÷ sequence heads, all-to-all back). Everything else in a block is per-token and runs on the slice.
With fewer key/value heads than sequence ranks (grouped-query attention: Llama 3's 8 for 32 query heads), each
key/value head is repeated before the all-to-all so every rank receives the ones its query heads use; this costs
sequence ÷ kv_heads times their all-to-all volume and nothing else.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from llmforge.config.parallel import COLUMN_PARALLEL, ROW_PARALLEL, Layout
from llmforge.config.recipe import ModelConfig
from llmforge.model.gpt import GPT, IGNORE_INDEX, Attention, CoreAttention, RouterOutput, router_output


def attach_router_outputs(model: nn.Module, cfg: ModelConfig) -> int:
    """After AutoEP replaced the MoE blocks (at deepspeed.initialize): make each replacement return (output,
    RouterOutput) as MoE.forward does, through a forward hook that scores the block's input with the replacement's
    router weights (the same parameter AutoEP routes with, so the auxiliary losses train it). Returns the number
    of blocks hooked."""
    m = cfg.moe
    hooked = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "AutoEPMoELayer":
            continue
        layer = int(name.split(".")[1])

        def hook(module: nn.Module, args: tuple, output: Any, layer: int = layer) -> tuple[torch.Tensor, RouterOutput]:
            x = args[0]
            gate = cast(nn.Module, cast(nn.Module, module.router).gate)
            logits = gate(x.reshape(-1, x.shape[-1])).float()
            probs = logits.softmax(dim=-1)
            _, chosen = probs.topk(m.top_k, dim=-1)
            routed = router_output(logits, chosen, m.aux_loss_weight, m.router_z_loss_weight, layer, probs=probs)
            return (output[0] if isinstance(output, tuple) else output), routed

        module.register_forward_hook(hook)
        hooked += 1
    return hooked


def merge_expert_files(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """GPT state-dict entries from the per-expert files an AutoEP checkpoint holds (DeepSpeed writes one per MoE
    block and expert, its keys `<block>.moe.experts.<w>.<global expert>`): each block's experts stacked in order."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for state in states:
        for key, tensor in state.items():
            name, _, expert = key.rpartition(".")
            pieces.setdefault(name, {})[int(expert)] = tensor
    return {name: torch.stack([by[e] for e in sorted(by)]) for name, by in pieces.items()}


def autoep_to_gpt_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoEP keeps an MoE block's router as `moe.router.gate`; GPT names it `moe.gate`."""
    return {k.replace(".moe.router.gate.", ".moe.gate."): v for k, v in state.items()}


def tensor_shard_dim(name: str) -> Optional[int]:
    """The dimension a tensor-parallel checkpoint splits parameter `name` along (0 column, 1 row), or None when
    every rank holds the whole parameter."""
    if any(re.match(p, "." + name) for p in COLUMN_PARALLEL):
        return 0
    if any(re.match(p, "." + name) for p in ROW_PARALLEL):
        return 1
    return None


def merge_tensor_shards(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One whole state dict from the tensor ranks' state dicts, in tensor-rank order."""
    merged = {}
    for name, first in states[0].items():
        dim = tensor_shard_dim(name)
        merged[name] = first if dim is None else torch.cat([s[name] for s in states], dim=dim)
    return merged


class UlyssesAttention(nn.Module):
    """`CoreAttention` over a sequence group: (B, heads, T/sp, D) in and out, attention over all T tokens of
    heads/sp heads in between. The wrapped core keeps its name (`local_attn.core`), which holds no parameters."""

    def __init__(self, core: CoreAttention, group: Any):
        from deepspeed.sequence.layer import DistributedAttention

        super().__init__()
        self.core, self.size = core, dist.get_world_size(group)
        self._documents: Optional[torch.Tensor] = None
        # DeepSpeed's all-to-all takes batch-first (B, T, heads, D): sequence at dim 1, heads at dim 2.
        self.dist = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # after the all-to-all: whole sequences of this rank's heads, so the document mask applies as on one rank
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return self.core(q, k, v, self._documents).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """`documents`: (B, T) of the whole sequences (every rank holds them), for document-masked attention."""
        self._documents = documents
        if k.shape[2] != q.shape[2]:
            raise ValueError("sequence-parallel attention takes no KV cache (generation runs on one rank)")
        kv = k.shape[1]
        if kv % self.size:
            # Fewer key/value heads than ranks (or not a multiple): repeat each so every rank receives whole ones.
            # Adjacent copies keep grouped-query order: query head i still meets key/value head i // group.
            repeat = math.lcm(kv, self.size) // kv
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = self.dist(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
        return out.transpose(1, 2)


def apply_sequence_parallel(model: GPT, group: Any) -> GPT:
    """Run every attention core through Ulysses over `group`, in place."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.core = UlyssesAttention(module.core, group)  # type: ignore[assignment]
    return model


class SequenceSlice:
    """Which tokens of each sample a sequence rank holds, and the loss normalisation that makes the group's
    slices one sequence: each slice's summed loss is divided by the whole sequences' counts, so the slices' losses
    sum to the sequences' mean loss whatever each slice holds. DeepSpeed averages gradients over its data-parallel
    group, which holds the sequence ranks too, so the loss a rank backpropagates is `scale` (= sequence) times its
    slice's share: the average over a sequence group is then the sum of its shares."""

    def __init__(self, layout: Layout):
        self.size, self.rank = layout.sequence, layout.sequence_rank
        self.scale = float(layout.sequence)

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(inputs, targets, forward kwargs) of this rank's slice of (B, T) inputs and targets."""
        if self.size == 1:
            return inputs, targets, {}
        n = inputs.shape[1] // self.size
        lo = self.rank * n
        totals = ((targets != IGNORE_INDEX).sum(), targets.numel())
        return inputs[:, lo : lo + n], targets[:, lo : lo + n], {"offset": lo, "totals": totals}
