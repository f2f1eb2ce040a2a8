"""Typed recipe: one small dataclass per section, each field documented and validated in `__post_init__`.

Field errors are raised as `ConfigError(key, problem)` with the key relative to the section; the loader adds the
section prefix and the file name, so the user sees `recipe error: recipes/x.yaml: train.lr: must be > 0`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from llmforge.config.data import DataConfig, DatasetSpec, SourceSpec  # noqa: F401  (re-exported)
from llmforge.config.recipe_base import ConfigError, doc, positive


@dataclass
class RunConfig:
    name: str = doc("run", "Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = doc("runs", "Parent directory of run directories.")
    seed: int = doc(1234, "Seed for model init, data order and dropout.")

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")


@dataclass
class TokenizerConfig:
    type: Literal["char", "sentencepiece", "hf"] = doc(
        "char", "char | sentencepiece (BPE, trained by train_tokenizer) | hf (a local Hugging Face tokenizer dir)."
    )
    path: Optional[str] = doc(None, "Tokenizer file (char .json, sentencepiece .model) or HF directory.")
    vocab_size: Optional[int] = doc(
        None,
        "Vocabulary size to train (char: an upper bound; sentencepiece: exact, "
        "required to train one); not needed to use a trained tokenizer.",
    )
    sample_bytes: int = doc(100_000_000, "Cleaned text sampled from the sources to train the tokenizer on.")
    byte_fallback: bool = doc(True, "sentencepiece: unknown characters become UTF-8 byte tokens.")

    def __post_init__(self) -> None:
        positive(self, "vocab_size", "sample_bytes")


@dataclass
class ActivationCheckpointingConfig:
    mode: Literal["none", "full", "every_k", "selective"] = doc(
        "none", "none, full (every block), every_k (every `every`-th block) or selective (attention only)."
    )
    every: int = doc(1, "For every_k: checkpoint blocks 0, k, 2k, ...")

    def __post_init__(self) -> None:
        positive(self, "every")


@dataclass
class MoEConfig:
    num_experts: int = doc(0, "Routed experts per MoE block; 0 = a dense model (every block has one SwiGLU MLP).")
    top_k: int = doc(2, "Experts each token is routed to (softmax over all experts, then the top k, renormalised).")
    every: int = doc(1, "Blocks 0, every, 2·every, ... are MoE blocks, the others dense; ignored when layers is set.")
    layers: Optional[list[int]] = doc(None, "Exactly these blocks (0-based) are MoE blocks; null: see every.")
    d_ff: Optional[int] = doc(None, "Hidden size of each expert's SwiGLU; null = model.d_ff's resolved width.")
    shared_experts: int = doc(0, "Experts every token also passes through, unweighted (DeepSeek-MoE, Qwen2-MoE).")
    capacity_factor: Optional[float] = doc(
        None,
        "null: dropless (every token reaches its top-k experts). A number c: an expert takes at most "
        "ceil(c · tokens · top_k / num_experts) assignments of a micro-batch, every token's first choice before "
        "any second one, in token order; the rest are dropped (that expert adds nothing for them) and counted.",
    )
    aux_loss_weight: float = doc(
        0.01, "Weight of the load-balancing loss num_experts · sum_e f_e · P_e (Switch; Mixtral's form for top-k)."
    )
    router_z_loss_weight: float = doc(
        0.001, "Weight of the router z-loss, the mean squared log-sum-exp of the router logits (ST-MoE)."
    )
    impl: Literal["grouped", "loop"] = doc(
        "grouped",
        "grouped: every expert in one grouped GEMM (torch grouped_mm) over tokens sorted by expert; loop: one "
        "matmul per expert (the reference; same results).",
    )

    def __post_init__(self) -> None:
        positive(self, "top_k", "every", "d_ff", "capacity_factor")
        if self.num_experts < 0 or self.shared_experts < 0:
            raise ConfigError("num_experts", "num_experts and shared_experts must be >= 0")
        if self.num_experts and self.top_k > self.num_experts:
            raise ConfigError("top_k", f"{self.top_k} is more than num_experts={self.num_experts}")
        if self.aux_loss_weight < 0 or self.router_z_loss_weight < 0:
            raise ConfigError("aux_loss_weight", "aux_loss_weight and router_z_loss_weight must be >= 0")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError("layers", f"must be non-empty block indices >= 0, got {self.layers}")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class ModelConfig:
    vocab_size: Optional[int] = doc(None, "Vocabulary size; null takes it from the tokenizer.")
    max_seq_len: Optional[int] = doc(None, "Longest sequence the model accepts; null takes data.seq_len.")
    d_model: int = doc(128, "Hidden size.")
    n_layers: int = doc(4, "Number of transformer blocks.")
    n_heads: int = doc(4, "Attention (query) heads.")
    n_kv_heads: Optional[int] = doc(None, "Key/value heads for grouped-query attention; null = n_heads.")
    d_ff: Optional[int] = doc(None, "MLP hidden size; null = 8/3·d_model (swiglu, rounded up to 64) or 4·d_model.")
    mlp: Literal["swiglu", "gelu"] = doc("swiglu", "MLP kind.")
    norm: Literal["rmsnorm", "layernorm"] = doc("rmsnorm", "Normalisation layer.")
    norm_eps: float = doc(1e-5, "Epsilon of the norm layers.")
    position: Literal["rope", "learned"] = doc("rope", "Rotary or learned absolute position embeddings.")
    rope_theta: float = doc(10000.0, "RoPE base.")
    tie_embeddings: bool = doc(True, "Share the token embedding with the LM head.")
    dropout: float = doc(0.0, "Dropout on attention weights and residual branches.")
    init_std: float = doc(0.02, "Init std; residual output projections use init_std / sqrt(2·n_layers).")
    attn_impl: Literal["sdpa", "reference"] = doc(
        "sdpa", "sdpa (torch scaled_dot_product_attention) or reference (explicit mask + softmax)."
    )
    attention_mask: Literal["causal", "document"] = doc(
        "causal",
        "causal: every token of a packed window attends to every earlier one; document: only to earlier tokens of "
        "its own document (documents end at the tokenizer's EOS) and positions restart at each document, as Llama 3 "
        "trains and Megatron's --reset-attention-mask --reset-position-ids do. Training and val loss only; "
        "generation sees one document either way.",
    )
    activation_checkpointing: ActivationCheckpointingConfig = doc(
        text="Recompute activations in the backward pass to save memory.", factory=ActivationCheckpointingConfig
    )
    moe: MoEConfig = doc(text="Mixture of experts: which blocks route tokens to experts, and how.", factory=MoEConfig)

    def __post_init__(self) -> None:
        positive(
            self,
            "vocab_size",
            "max_seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "norm_eps",
            "rope_theta",
            "init_std",
        )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise ConfigError("d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2 and self.position == "rope":
            raise ConfigError("d_model", f"head dim {self.d_model // self.n_heads} must be even for rope")
        if self.n_heads % self.kv_heads:
            raise ConfigError("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.moe.enabled:
            if self.mlp != "swiglu":
                raise ConfigError("moe.num_experts", f"experts are SwiGLU MLPs; set model.mlp: swiglu (got {self.mlp})")
            outside = [i for i in self.moe_layers if i >= self.n_layers]
            if outside:
                raise ConfigError("moe.layers", f"{outside} outside the {self.n_layers} blocks (0-based)")
            if self.moe.impl == "grouped" and (self.d_model % 8 or self.expert_ff % 8):
                raise ConfigError(
                    "moe.impl",
                    f"grouped GEMM needs d_model ({self.d_model}) and the expert width ({self.expert_ff}) divisible "
                    "by 8; use moe.impl: loop",
                )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def moe_layers(self) -> list[int]:
        """The blocks whose MLP is a mixture of experts (none for a dense model)."""
        if not self.moe.enabled:
            return []
        if self.moe.layers is not None:
            return sorted(set(self.moe.layers))
        return list(range(0, self.n_layers, self.moe.every))

    @property
    def expert_ff(self) -> int:
        """Hidden size of one expert."""
        return self.moe.d_ff or self.ff_dim

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-int(8 * self.d_model / 3) // 64) * 64
        return 4 * self.d_model


@dataclass
class SpikeGuardConfig:
    enabled: bool = doc(True, "Skip steps whose loss is non-finite or a spike; roll back on persistent divergence.")
    window: int = doc(50, "Recent good steps whose loss mean/std define a spike.")
    min_history: int = doc(10, "Good steps needed before spikes are judged.")
    threshold_std: float = doc(6.0, "A step loss above mean + threshold_std·std of the window is a spike.")
    max_bad_steps: int = doc(4, "This many skipped steps within bad_window trigger a rollback.")
    bad_window: int = doc(20, "Steps over which skipped steps are counted.")

    def __post_init__(self) -> None:
        positive(self, "window", "min_history", "threshold_std", "max_bad_steps", "bad_window")
        if self.min_history > self.window:
            raise ConfigError("min_history", f"{self.min_history} exceeds window={self.window}")


BLOCK_LINEARS = ["wq", "wk", "wv", "wo", "gate", "up", "down"]  # the Linear layers inside a block, by name


@dataclass
class Fp8Config:
    scaling: Literal["none", "tensorwise", "rowwise"] = doc(
        "none",
        "FP8 matmuls in the blocks' Linear layers (torchao Float8Linear, dynamic scaling): none, tensorwise (one "
        "scale per tensor) or rowwise (one per row, more accurate, slower). Embedding and LM head stay in "
        "train.precision. Needs the layers' dimensions divisible by 16.",
    )
    layers: list[str] = doc(text="Linear layers inside a block that run in FP8.", factory=lambda: list(BLOCK_LINEARS))

    def __post_init__(self) -> None:
        unknown = [t for t in self.layers if t not in BLOCK_LINEARS]
        if unknown or not self.layers:
            raise ConfigError("layers", f"must be a non-empty subset of {BLOCK_LINEARS}, got {self.layers}")

    @property
    def enabled(self) -> bool:
        return self.scaling != "none"


@dataclass
class MuonConfig:
    lr: float = doc(
        0.02,
        "Peak LR of the Muon matrices (in spectral-norm units per update); follows train.schedule's shape: "
        "muon.lr x lr_at(step) / train.lr.",
    )
    momentum: float = doc(0.95, "Nesterov momentum of the Muon matrices.")
    weight_decay: Optional[float] = doc(None, "Decoupled weight decay of the Muon matrices; null = train.weight_decay.")

    def __post_init__(self) -> None:
        positive(self, "lr")
        positive(self, "weight_decay", allow_zero=True)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum}")


@dataclass
class BatchWarmupConfig:
    """train.batch_warmup: the global batch ramps up from `start` sequences (GPT-3, Megatron's --rampup-batch-size)."""

    start: int = doc(0, "Sequences per optimizer step at the start; 0 = no warmup (the full batch from step 1).")
    increment: Optional[int] = doc(None, "Sequences added at each increase; null = start.")
    tokens: int = doc(
        0,
        "Training tokens over which the batch grows from start to train.global_batch_size, in equal spans of "
        "consumed tokens (one increase per span); the full batch after them.",
    )

    def __post_init__(self) -> None:
        positive(self, "start", "tokens", allow_zero=True)
        positive(self, "increment")
        if self.start and not self.tokens:
            raise ConfigError("tokens", "must be > 0 when start is set")


@dataclass
class TrainConfig:
    max_steps: int = doc(2000, "Optimizer steps to train.")
    micro_batch_size: int = doc(12, "Samples per rank per forward/backward.")
    grad_accum_steps: int = doc(
        1,
        "Micro-batches accumulated per optimizer step; derived from global_batch_size when that is set (or when "
        "resuming a checkpoint, whose global batch is kept) and this is left at 1.",
    )
    global_batch_size: Optional[int] = doc(
        None,
        "Sequences per optimizer step over all data-parallel replicas. Set, it is kept whatever the layout or "
        "world size: grad_accum_steps = global_batch_size / (micro_batch_size x replicas), refused in one line "
        "when that is not whole. Null: micro_batch_size x grad_accum_steps x replicas, and a resume keeps the "
        "checkpoint's.",
    )
    lr: float = doc(1e-3, "Peak learning rate.")
    min_lr: float = doc(1e-4, "Learning rate at the end of the decay.")
    warmup_steps: int = doc(100, "Linear warmup steps from 0 to lr.")
    schedule: Literal["cosine", "wsd", "constant"] = doc("cosine", "Decay after warmup.")
    decay_fraction: float = doc(
        0.2, "wsd: fraction of max_steps spent in the final linear decay (a data.stages lr_decay stage: its steps)."
    )
    batch_warmup: BatchWarmupConfig = doc(
        text="Global batch size warmup: smaller optimizer steps first (fewer micro-batches accumulated).",
        factory=BatchWarmupConfig,
    )
    weight_decay: float = doc(0.1, "AdamW weight decay (not applied to norms, biases, embeddings).")
    betas: list[float] = doc(text="AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = doc(
        "auto",
        "Training precision. auto: bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with "
        "AVX512-BF16, AMX or Arm BF16), fp16 on an older GPU, fp32 on other CPUs (bf16 is emulated there, ~2.3x "
        "slower than fp32); resolved and logged at start.",
    )
    compile: bool = doc(
        False,
        "torch.compile each transformer block (one shared graph) and the loss (a fused fp32 "
        "cross-entropy that keeps no fp32 copy of the logits); compiled on the first step, "
        "tens of seconds; needs a C++ compiler on CPU, Triton on GPU. Checkpoints do not "
        "depend on it.",
    )
    loss_chunk: int = doc(
        0,
        "Compute the LM head and loss over this many tokens at a time, recomputing each chunk's "
        "logits in backward, so the (tokens x vocab) fp32 logits are never held whole; 0 = all "
        "at once.",
    )
    z_loss: float = doc(0.0, "Weight of the z-loss (mean squared log-partition of the logits, PaLM); 0 disables.")
    spike_guard: SpikeGuardConfig = doc(text="Loss-spike and NaN guard.", factory=SpikeGuardConfig)
    fp8: Fp8Config = doc(text="FP8 training of the blocks' Linear layers (torchao).", factory=Fp8Config)
    optimizer: Literal["adamw", "muon"] = doc(
        "adamw",
        "adamw, or muon: DeepSpeed's Muon (momentum orthogonalized by Newton-Schulz) on the blocks' matrices and "
        "AdamW (lr, betas, eps, weight_decay above) on embeddings, LM head, norms and biases, as the Muon papers do.",
    )
    muon: MuonConfig = doc(text="Muon's settings (train.optimizer: muon).", factory=MuonConfig)
    init_from: Optional[str] = doc(
        None,
        "Start from these weights instead of a random init: an llmforge run dir / "
        "checkpoint or a local Hugging Face Llama dir. The architecture comes from "
        "them; step, optimizer and data position start fresh. Required by SFT/DPO.",
    )

    def __post_init__(self) -> None:
        positive(self, "max_steps", "micro_batch_size", "grad_accum_steps", "lr", "eps")
        positive(self, "min_lr", "warmup_steps", "weight_decay", "grad_clip", "z_loss", "loss_chunk", allow_zero=True)
        positive(self, "global_batch_size")
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"{self.min_lr} is above lr={self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError("decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")

    def global_batch(self, data_parallel: int) -> int:
        """Samples per optimizer step over `data_parallel` ranks (DeepSpeed's train_batch_size)."""
        return self.micro_batch_size * self.grad_accum_steps * data_parallel


@dataclass
class ParallelConfig:
    tensor: int = doc(
        1, "Tensor-parallel ranks (DeepSpeed AutoTP): each holds 1/tensor of every attention and MLP matrix."
    )
    sequence: int = doc(1, "Sequence-parallel ranks (Ulysses): each holds seq_len/sequence tokens of the same samples.")
    expert: int = doc(
        1,
        "Expert-parallel ranks (DeepSpeed AutoEP): each MoE block's experts are split over this many data-parallel "
        "ranks, tokens travel to their experts' rank and back (all-to-all). Needs model.moe.",
    )

    def __post_init__(self) -> None:
        positive(self, "tensor", "sequence", "expert")

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one data-parallel replica: tensor x sequence."""
        return self.tensor * self.sequence


@dataclass
class DeepSpeedSection:
    config: str = doc(
        "llmforge:zero2.json",
        "Plain DeepSpeed JSON the composed config starts from; `llmforge:NAME` is one shipped with llmforge "
        "(zero0-3.json, zero3_offload.json).",
    )
    overrides: dict[str, Any] = doc(text="DeepSpeed keys merged over the JSON (nested dicts merge).", factory=dict)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = doc(None, "Checkpoint directory; null = <run dir>/checkpoints.")
    interval: int = doc(500, "Save every this many steps (and at the end); 0 = only at the end.")
    keep_last: int = doc(3, "Complete checkpoints kept; older ones are deleted after a new one commits.")

    def __post_init__(self) -> None:
        positive(self, "interval", allow_zero=True)
        positive(self, "keep_last")


@dataclass
class EvalConfig:
    interval: int = doc(250, "Evaluate val loss every this many steps (and at the end); 0 disables.")
    batches: int = doc(20, "Micro-batches per rank in each evaluation.")
    at_start: bool = doc(True, "Also evaluate before the first step of a fresh run.")
    per_source: bool = doc(
        False,
        "Pre-training: also score each dataset's own val split, logged as val_loss.<name> (eval.batches "
        "micro-batches each), to see what a data stage does to each source.",
    )

    def __post_init__(self) -> None:
        positive(self, "interval", allow_zero=True)
        positive(self, "batches")


@dataclass
class LoggingConfig:
    interval: int = doc(10, "Console line and metrics.jsonl row every this many steps.")
    tensorboard: bool = doc(True, "Write TensorBoard events to <run dir>/tensorboard (one series per quantity).")

    def __post_init__(self) -> None:
        positive(self, "interval")


@dataclass
class LoraConfig:
    rank: int = doc(0, "LoRA rank; 0 = full fine-tuning. Base weights are frozen, adapters merge back on export.")
    alpha: float = doc(16.0, "LoRA scale numerator: the update is (alpha / rank) · B·A.")
    dropout: float = doc(0.0, "Dropout on the adapter input.")
    targets: list[str] = doc(
        text="Linear layers that get adapters (names inside a block).",
        factory=lambda: ["wq", "wk", "wv", "wo", "gate", "up", "down"],
    )

    def __post_init__(self) -> None:
        positive(self, "rank", allow_zero=True)
        positive(self, "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in BLOCK_LINEARS]
        if unknown or not self.targets:
            raise ConfigError("targets", f"must be a non-empty subset of {sorted(BLOCK_LINEARS)}, got {self.targets}")


@dataclass
class DPOConfig:
    beta: float = doc(0.1, "Strength of the implicit KL penalty towards the reference model.")
    loss: Literal["sigmoid", "ipo"] = doc("sigmoid", "sigmoid (DPO) or ipo (squared loss around 1/(2·beta)).")
    label_smoothing: float = doc(0.0, "sigmoid: probability that a preference label is flipped (cDPO).")

    def __post_init__(self) -> None:
        positive(self, "beta")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class PostTrainConfig:
    train_file: Optional[str] = doc(
        None, "JSONL: SFT {prompt, response} or {messages: [{role, content}]}; DPO {prompt, chosen, rejected}."
    )
    val_file: Optional[str] = doc(None, "Held-out JSONL of the same form; null = val_fraction of train_file.")
    val_fraction: float = doc(0.05, "Examples (by content hash) held out when there is no val_file.")
    lora: LoraConfig = doc(text="Low-rank adapters instead of full fine-tuning.", factory=LoraConfig)
    dpo: DPOConfig = doc(text="DPO objective (launch/dpo.py).", factory=DPOConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)

    def __post_init__(self) -> None:
        if self.model.max_seq_len is not None and self.model.max_seq_len < self.data.seq_len:
            raise ConfigError(
                "model.max_seq_len", f"{self.model.max_seq_len} is below data.seq_len={self.data.seq_len}"
            )
        if self.train.warmup_steps > self.train.max_steps:
            raise ConfigError(
                "train.warmup_steps", f"{self.train.warmup_steps} exceeds train.max_steps={self.train.max_steps}"
            )
        for i, stage in enumerate(self.data.stages):
            if stage.lr_decay and self.train.schedule != "wsd":
                raise ConfigError(
                    f"data.stages[{i}].lr_decay",
                    f"decays the learning rate of train.schedule: wsd, not {self.train.schedule}; set "
                    "train.schedule: wsd",
                )

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
