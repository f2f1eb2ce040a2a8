"""The transformer, the wraps applied to it (LoRA, activation checkpointing, compile), generation, FLOP accounting."""

from llmforge.model.generate import generate, sample_next
from llmforge.model.gpt import GPT, IGNORE_INDEX, KVCache
from llmforge.model.wraps import apply_activation_checkpointing, apply_wraps, compile_model, compile_unavailable

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "KVCache",
    "apply_activation_checkpointing",
    "apply_wraps",
    "compile_model",
    "compile_unavailable",
    "generate",
    "sample_next",
]
