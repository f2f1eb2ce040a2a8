"""The one place where cross-cutting wraps are applied to a built model, in order (torchtitan's `parallelize_llama`
is the picture): sequence parallelism, LoRA adapters, activation checkpointing, then torch.compile. Blocks are
selected by class, never by name; gpt.py knows nothing of any of them."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from llmforge.config.recipe import ActivationCheckpointingConfig, LoraConfig
from llmforge.model.gpt import GPT, Attention, Block
from llmforge.model.lora import apply_lora
from llmforge.model.parallel import apply_sequence_parallel


def apply_wraps(
    model: GPT,
    lora: LoraConfig,
    activation_checkpointing: ActivationCheckpointingConfig,
    compile: bool,
    sequence_group: Optional[Any] = None,
) -> int:
    """Sequence parallelism (given a sequence group), LoRA (when lora.rank > 0), activation checkpointing,
    compile — in that order, in place. Tensor parallelism is DeepSpeed's AutoTP, which shards the layers that
    model/parallel.py names when the engine is built. Returns the number of trainable LoRA parameters (0 without
    LoRA)."""
    if sequence_group is not None:
        apply_sequence_parallel(model, sequence_group)
    adapters = apply_lora(model, lora) if lora.rank else 0
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_model(model)
    return adapters


def _wrap(module: nn.Module) -> nn.Module:
    # Non-reentrant: works with kwargs, and recomputation goes through module hooks (needed by ZeRO-3).
    # The wrapper strips its own prefix from state_dict keys, so checkpoints do not depend on the mode.
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_activation_checkpointing(model: GPT, cfg: ActivationCheckpointingConfig) -> GPT:
    """Wrap blocks (full / every_k) or only their attention (selective) so activations are recomputed."""
    if cfg.mode == "none":
        return model
    for i, block in enumerate(model.blocks):
        assert isinstance(block, Block)
        if cfg.mode == "full" or (cfg.mode == "every_k" and i % cfg.every == 0):
            model.blocks[i] = _wrap(block)
        elif cfg.mode == "selective":
            assert isinstance(block.attn, Attention)
            block.attn = _wrap(block.attn)  # type: ignore[assignment]  # the wrapper runs the same Attention
    return model


def compile_model(model: GPT) -> GPT:
    """torch.compile every transformer block and the loss in place, after activation checkpointing (the recomputation
    then runs the compiled code too). Blocks share one compiled graph: their code is the same and parameters are graph
    inputs, so compile time does not grow with depth. The compiled loss fuses the fp32 cross-entropy (see TokenLoss).
    In-place compilation keeps state_dict keys, so checkpoints and export do not depend on it."""
    for block in model.blocks:
        block.compile()
    model.loss.compile()
    return model


def compile_unavailable(on_cpu: bool) -> Optional[str]:
    """Why torch.compile could not build kernels here, or None: Inductor needs a C++ compiler on CPU (found the way
    Inductor itself searches: $CXX, else g++ / clang++) and Triton on GPU."""
    # Inductor's modules are imported only here: importing them costs ~1.5 s, and only compile users need them.
    if on_cpu:
        from torch._inductor import exc as inductor_exc
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except inductor_exc.InvalidCxxCompiler:
            return "torch.compile on CPU needs a C++ compiler (g++, clang++ or the one $CXX names); none was found"
        return None
    from torch.utils._triton import has_triton

    return None if has_triton() else "torch.compile on GPU needs Triton, which is not installed"
