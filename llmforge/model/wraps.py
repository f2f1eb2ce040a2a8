"""The one place where cross-cutting wraps are applied to a built model, in order (torchtitan's `parallelize_llama`
is the picture): sequence parallelism, LoRA adapters, activation checkpointing, FP8 linears, then torch.compile.
Blocks are selected by class, never by name; gpt.py knows nothing of any of them."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from llmforge.config.recipe import ActivationCheckpointingConfig, Fp8Config, LoraConfig
from llmforge.model.gpt import GPT, Attention, Block
from llmforge.model.lora import apply_lora
from llmforge.model.parallel import apply_sequence_parallel


def apply_wraps(
    model: GPT,
    lora: LoraConfig,
    activation_checkpointing: ActivationCheckpointingConfig,
    compile: bool,
    sequence_group: Optional[Any] = None,
    fp8: Optional[Fp8Config] = None,
) -> int:
    """Sequence parallelism (given a sequence group), LoRA (when lora.rank > 0), activation checkpointing, FP8
    (when fp8.scaling is not none), compile — in that order, in place. Tensor parallelism is DeepSpeed's AutoTP,
    which shards the layers that model/parallel.py names when the engine is built. Returns the number of trainable
    LoRA parameters (0 without LoRA)."""
    if sequence_group is not None:
        apply_sequence_parallel(model, sequence_group)
    adapters = apply_lora(model, lora) if lora.rank else 0
    apply_activation_checkpointing(model, activation_checkpointing)
    if fp8 is not None and fp8.enabled:
        apply_fp8(model, fp8)
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


def apply_fp8(model: GPT, cfg: Fp8Config) -> int:
    """Swap the blocks' Linear layers named in cfg.layers for torchao's Float8Linear (dynamic tensorwise or rowwise
    scaling: inputs, weights and output gradients cast to float8 for each matmul, weights kept in the training
    precision, so optimizer, ZeRO and checkpoints see the same parameters and state_dict keys). The LM head and the
    embedding are never converted (FP8 there costs the most accuracy; torchtitan and OLMo-core leave them too).
    Returns the number of layers converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted = []

    def chosen(module: nn.Module, fqn: str) -> bool:
        # An MoE block's router and shared experts stay in the training precision (experts are not Linear layers).
        take = (
            isinstance(module, nn.Linear)
            and fqn.startswith("blocks.")
            and ".moe." not in fqn
            and fqn.split(".")[-1] in cfg.layers
        )
        if take:
            converted.append(fqn)
        return take

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(cfg.scaling), module_filter_fn=chosen)
    return len(converted)


def fp8_problem(d_model: int, ff_dim: int, kv_dim: int) -> Optional[str]:
    """Why the blocks' Linear layers cannot run FP8 matmuls (torch._scaled_mm needs both dimensions of each weight
    divisible by 16), or None."""
    bad = {k: v for k, v in {"d_model": d_model, "the MLP width": ff_dim, "n_kv_heads x head_dim": kv_dim}.items()}
    bad = {k: v for k, v in bad.items() if v % 16}
    if bad:
        return ", ".join(f"{k} {v}" for k, v in bad.items()) + " not divisible by 16 (FP8 matmuls need it)"
    return None


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
