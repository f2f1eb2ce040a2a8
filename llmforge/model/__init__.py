"""The transformer, activation checkpointing, compilation, generation and FLOP accounting."""

from llmforge.model.checkpointing import (apply_activation_checkpointing, compile_model,
                                          compile_unavailable)
from llmforge.model.generate import generate, sample_next
from llmforge.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "apply_activation_checkpointing", "compile_model", "compile_unavailable", "generate",
           "sample_next"]
