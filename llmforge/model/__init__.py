"""The transformer, activation checkpointing, generation and FLOP accounting."""

from llmforge.model.checkpointing import apply_activation_checkpointing
from llmforge.model.generate import generate, sample_next
from llmforge.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "apply_activation_checkpointing", "generate", "sample_next"]
