"""LoRA (Hu et al., 2021) for the GPT's linear layers: y = W·x + (alpha/r)·B·A·x with W frozen, A ~ Kaiming, B = 0
(so training starts exactly at the base model). `merge_lora` folds B·A into W and restores plain nn.Linear layers,
so merged weights load, generate and export like any other llmforge model."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from llmforge.config.recipe import LoraConfig


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            out.weight.copy_((self.base.weight.float() + delta).to(out.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _parents(model: nn.Module) -> list[nn.Module]:
    """The modules whose linear layers take adapters: each block's attention and dense MLP (an MoE block has no
    dense MLP: its router and stacked experts stay frozen)."""
    blocks = cast(nn.ModuleList, model.blocks)
    return [m for block in blocks for m in (block.attn, block.mlp) if isinstance(m, nn.Module)]


def _targets(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str]]:
    found: list[tuple[nn.Module, str]] = []
    for parent in _parents(model):
        for name in names:
            if isinstance(getattr(parent, name, None), (nn.Linear, LoRALinear)):
                found.append((parent, name))
    return found


def apply_lora(model: nn.Module, cfg: LoraConfig) -> int:
    """Freeze every weight and put adapters on the target layers; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name in _targets(model, cfg.targets):
        layer = getattr(parent, name)
        if isinstance(layer, nn.Linear):
            setattr(parent, name, LoRALinear(layer, cfg.rank, cfg.alpha, cfg.dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + (alpha/r)·B·A."""
    for parent in _parents(model):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
