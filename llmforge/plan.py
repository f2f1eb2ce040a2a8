"""`llmforge plan`: before launching, what a recipe needs per GPU for each ZeRO stage × activation-checkpointing
choice, and how long it will take.

Memory per GPU (bytes; N parameters, d data-parallel ranks, bf16/fp16 training with fp32 master weights and Adam):
- model states at the peak of a step (the optimizer update), following the ZeRO paper (Rajbhandari et al., 2020)
  and fitted to what DeepSpeed 0.19 holds, measured as bytes per parameter on 2 CPU ranks at two model sizes
  (bench/results/memory-cpu.md): params 2N (stage 3: 2N/d); gradients stage 0: 2N 16-bit + 4N fp32
  accumulation, stage 1-2: 2N + 4N/d, stage 3: 2N/d + 4N/d; optimizer 12N fp32 master + exp_avg + exp_avg_sq
  (stage 1-3: 12N/d), plus at stage 0 the update's 4N fp32 temporary. fp32 training (measured the same way):
  params 4N (stage 3: 4N/d); gradients 4N, at stage 0 + 4N (the flattened all-reduce copy), at stage 3 + 4N/d;
  optimizer stage 0: 8N (exp_avg + exp_avg_sq), stages 1-3: 12N/d (DeepSpeed keeps an fp32 master partition even
  of fp32 weights).
- activations of one micro-batch (T = b·s tokens, 16-bit elements of e bytes), counted from the tensors each
  operation keeps for backward: per block two norms (RMSNorm as a fused kernel, as on GPU: input T·d·e + fp32
  rstd T·4; its unfused CPU composite keeps two fp32 copies, T·(8d + 8); LayerNorm input + fp32 mean and rstd,
  T·(d·e + 8)), each norm's output as the next linear's input (T·d·e),
  attention q, k, v and output T·(2d + 2·kv_dim)·e + fp32 log-sum-exp T·heads·4 (a·s²·b·e more where attention is
  not a fused kernel), SwiGLU T·4·ff·e (GELU 2·ff). Full checkpointing keeps each block's input T·d·e;
  selective drops the attention tensors. The final norm and LM-head input, then the logits: the eager loss keeps
  their fp32 log-softmax (T·V·4), the compiled one (train.compile) the 16-bit logits and an fp32 log-sum-exp
  (T·(V·e + 8)); with train.loss_chunk = c nothing of them is kept, only c tokens' logits exist at a time.
  Compiled blocks keep a fused norm's tensors (on CPU too) and SwiGLU T·3·ff·e (the SiLU is recomputed).
  Transients on top (`transients=True`, the plan's figure): one block's recomputation under checkpointing and, at
  the loss, the logits' gradients: eager fp32 and 16-bit (T·V·(4 + e)), compiled 16-bit only (T·V·e); chunked,
  one chunk's kept part and gradients.
  tests/unit/test_plan.py holds the kept part within 10% of what the model saves for backward, measured on CPU,
  eager and compiled.
- buffers: DeepSpeed's gradient buckets (stage 1-2: reduce_bucket_size elements, twice with overlap_comm) and
  stage-3 prefetch/live parameters (bounded by stage3_max_live_parameters).
Throughput: FLOPs/token (6N + 12·L·d·s, ×4/3 of the forward share recomputed under full checkpointing) at an assumed
MFU of the device's peak; time to the recipe's token budget (max_steps × global batch × seq_len).

Parallel layouts (recipe `parallel`, llmforge/config/parallel.py): the GPUs split into d = gpus ÷ (tensor ×
sequence) data-parallel replicas. Tensor parallelism holds 1/tensor of each block's Linear weights (the embedding,
norms and LM head stay whole: model/parallel.py); ZeRO shards over the d × sequence ranks that share a tensor rank.
Activations: sequence parallelism divides every per-token tensor by `sequence` (attention holds all tokens of
heads ÷ sequence heads: the same size); tensor parallelism divides the attention and MLP tensors inside a block, not
the norms, the block boundaries or the logits. Communication per step and GPU (bytes sent, ring all-reduce
2(n-1)/n of the buffer, all-to-all (n-1)/n): data-parallel: the gradients once (ZeRO 1-2; ZeRO-3 also gathers the
16-bit weights twice); tensor: per block and micro-batch, 2 all-reduces of the b·s·d activations forward and 2
backward (+2 recomputed under full checkpointing); sequence: per block and micro-batch, 4 all-to-alls forward
(q, k, v, output) and 4 backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from llmforge.config import Recipe
from llmforge.config.deepspeed import compose_ds_config, refused_stage, resolve_precision
from llmforge.config.parallel import Layout, check_layout, make_layout
from llmforge.config.recipe import ModelConfig
from llmforge.errors import RecipeError
from llmforge.model.flops import flops_per_token, inactive_params
from llmforge.model.gpt import GPT
from llmforge.model.parallel import tensor_shard_dim

GB = 1024**3


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, non-embedding parameters), exactly, from a model built on the meta device."""
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    return total, model.num_params(non_embedding=True)


def params_per_rank(cfg: ModelConfig, tensor: int, expert: int = 1) -> int:
    """Parameters one rank holds: 1/tensor of each sharded block Linear, 1/expert of each MoE block's experts,
    the rest whole."""
    dense, experts = split_params(cfg, tensor)
    return dense + experts // expert


def rank_state_bytes(cfg: ModelConfig, layout: Layout, stage: int, precision: str = "bf16") -> dict[str, float]:
    """Model-state bytes of one rank (`model_state_bytes`' keys) under `layout`: the parameters outside the experts
    sharded by ZeRO over the data-parallel group, the rank's experts over the ranks holding the same ones."""
    n_dense, n_experts = split_params(cfg, layout.tensor)
    states = model_state_bytes(n_dense, stage, layout.zero, precision)
    if n_experts:
        local = model_state_bytes(n_experts // layout.expert, stage, layout.zero // layout.expert, precision)
        states = {k: v + local[k] for k, v in states.items()}
    return states


def split_params(cfg: ModelConfig, tensor: int = 1) -> tuple[int, int]:
    """(parameters outside the experts per tensor rank, routed experts' parameters): ZeRO shards the first over
    the data-parallel ranks and the second over the expert-data-parallel ranks (data ÷ expert)."""
    with torch.device("meta"):
        model = GPT(cfg)
    dense = experts = 0
    for name, p in model.named_parameters():
        if ".moe.experts." in name:
            experts += p.numel()
        else:
            dense += p.numel() // (tensor if tensor_shard_dim(name) is not None else 1)
    return dense, experts


def model_state_bytes(n_params: int, stage: int, dp: int, precision: str = "bf16") -> dict[str, float]:
    """Parameters, gradients and optimizer states per rank at the peak of a step (the optimizer update), as measured
    on DeepSpeed 0.19 CPU ranks (bench/memory_probe.py; tests/integration/test_plan.py keeps them within 15%)."""
    n = float(n_params)
    if precision == "fp32":
        # fp32 weights and gradients (whole until the reduce-scatter, stages 1-3 alike at the peak); stage 0 also a
        # flat fp32 copy of the gradients for the all-reduce; stages 1-3 an fp32 master partition (DeepSpeed copies
        # even fp32 weights) + exp_avg + exp_avg_sq, and at stage 3 the gradient partition
        params, grads, optim = 4 * n, (8 * n if stage == 0 else 4 * n + (4 * n / dp if stage == 3 else 0)), 12 * n
        if stage == 0:
            optim = 8 * n
    elif stage == 0:
        # 16-bit weights and gradients, fp32 gradient accumulation, fp32 master + exp_avg + exp_avg_sq, and the
        # update's fp32 temporary over the whole flat buffer
        params, grads, optim = 2 * n, 6 * n, 16 * n
    else:
        # full 16-bit gradients until the reduce-scatter (stages 1 and 2 alike at the peak, measured), the fp32
        # gradient partition, fp32 master + exp_avg + exp_avg_sq partitions
        params, grads, optim = 2 * n, (2 * n if stage < 3 else 2 * n / dp) + 4 * n / dp, 12 * n
    if stage >= 1:
        optim /= dp
    if stage >= 3:
        params /= dp
    return {"params": params, "grads": grads, "optimizer": optim}


def activation_bytes(
    cfg: ModelConfig,
    seq_len: int,
    micro_batch: int,
    mode: str,
    every: int = 1,
    fused_attention: bool = True,
    fused_norm: bool = True,
    elem: int = 2,
    loss_chunk: int = 0,
    compiled: bool = False,
    transients: bool = True,
    tensor: int = 1,
) -> float:
    """Activations of one micro-batch for an activation-checkpointing mode: what is kept for backward plus, with
    `transients`, what backward briefly adds on top (one block's recomputation, the logits' gradients).
    `seq_len` is the tokens a rank holds (seq_len ÷ sequence under sequence parallelism); `tensor` divides the
    attention and MLP tensors of a block (its shards), not the norms, block boundaries or logits.
    `compiled`: blocks and loss as train.compile builds them — block norms keep what a fused kernel keeps whatever
    `fused_norm` says (which then concerns only the final norm), SwiGLU keeps its two projections and their product
    (the SiLU is recomputed), the loss keeps the 16-bit logits and an fp32 log-sum-exp."""
    s, b, d, ff, L, V = seq_len, micro_batch, cfg.d_model, cfg.ff_dim, cfg.n_layers, cfg.vocab_size
    T = s * b
    kv = cfg.kv_heads * cfg.head_dim

    def norm_bytes(fused: bool) -> int:
        if cfg.norm == "layernorm":  # a native kernel everywhere: input + fp32 mean and rstd
            kept = T * (elem * d + 8)
        else:
            kept = T * (elem * d + 4) if fused else T * (8 * d + 8)
        return kept + elem * T * d  # its output, the input of the next linear(s)

    norm = norm_bytes(fused_norm or compiled)
    attn = (elem * T * (2 * d + 2 * kv) + 4 * T * cfg.n_heads) / tensor
    if not fused_attention:
        attn += elem * cfg.n_heads * s * s * b / tensor
    mlp = elem * T * ((3 if compiled else 4) if cfg.mlp == "swiglu" else 2) * ff / tensor
    if cfg.moe.enabled:
        # an MoE block keeps, per token: fp32 router logits and probabilities, and for each of its top_k
        # assignments the gathered input, the gate and up outputs, the gate's SiLU, their product, and the expert's
        # output in fp32 for the weighted sum (the MLP's share of the dense and MoE blocks averaged over the layers;
        # measured against CPU ranks in bench/parallel_layouts.py --experts)
        m, moe_layers = cfg.moe, len(cfg.moe_layers)
        routed = T * (8 * m.num_experts + m.top_k * (elem * (d + 4 * cfg.expert_ff) + 4 * d))
        shared = elem * T * 4 * m.shared_experts * cfg.expert_ff
        mlp = (mlp * (L - moe_layers) + (routed + shared) * moe_layers) / L
    layer = 2 * norm + attn + mlp
    boundary = elem * T * d
    recompute = layer if transients else 0
    if mode == "none":
        body = L * layer
    elif mode == "full":
        body = L * boundary + recompute
    elif mode == "every_k":
        wrapped = len(range(0, L, every))
        body = (L - wrapped) * layer + wrapped * boundary + recompute
    elif mode == "selective":
        body = L * (2 * norm + mlp) + (attn if transients else 0)
    else:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    head = norm_bytes(fused_norm)  # final norm (not compiled) + LM-head input
    return float(body + head + logits_bytes(T, V, elem, loss_chunk, compiled, transients))


def logits_bytes(
    tokens: int, vocab: int, elem: int = 2, loss_chunk: int = 0, compiled: bool = False, transients: bool = True
) -> float:
    """The logits' share of activation_bytes: what the loss keeps for backward, plus with `transients` the logits'
    gradients. Eager, the loss keeps the fp32 log-softmax and backward adds fp32 and 16-bit gradients; compiled, it
    keeps the 16-bit logits and their fp32 log-sum-exp, and backward writes the 16-bit gradient directly. Chunked,
    one chunk's logits exist at a time and nothing of them is kept between chunks."""
    kept, grads = (elem * vocab + 8, elem * vocab) if compiled else (4 * vocab, (4 + elem) * vocab)
    if 0 < loss_chunk < tokens:
        return float(loss_chunk * (kept + grads) if transients else 0)
    return float(tokens * (kept + (grads if transients else 0)))


def buffer_bytes(ds_config: dict, n_params: int, elem: int = 2) -> float:
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage in (1, 2):
        bucket = min(float(zero.get("reduce_bucket_size", 5e8)), n_params)
        return elem * bucket * (2 if zero.get("overlap_comm", False) else 1)
    if stage == 3:
        live = min(float(zero.get("stage3_max_live_parameters", 1e9)), n_params)
        prefetch = min(float(zero.get("stage3_prefetch_bucket_size", 5e7)), n_params)
        return elem * (live + prefetch)
    return 0.0


def communication_bytes(
    cfg: ModelConfig, layout: Layout, n_rank: int, stage: int, seq_len: int, micro_batch: int, accum: int, mode: str
) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step in each parallel dimension (16-bit gradients and activations)."""
    elem, L = 2, cfg.n_layers
    zero_group = layout.zero
    ring = 2 * (zero_group - 1) / zero_group if zero_group > 1 else 0.0
    data = ring * elem * n_rank * (1 + (2 if stage == 3 else 0))
    T = micro_batch * seq_len // layout.sequence  # tokens per rank and micro-batch
    tp, sp = layout.tensor, layout.sequence
    tensor = 0.0
    if tp > 1:
        reduces = 4 + (2 if mode == "full" else 0)
        tensor = L * accum * reduces * 2 * (tp - 1) / tp * elem * T * cfg.d_model
    sequence = 0.0
    if sp > 1:
        per_layer = elem * T * (2 * cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim) / tp  # q, output, k, v
        sequence = L * accum * 2 * (sp - 1) / sp * per_layer * (1.5 if mode == "full" else 1.0)
    expert = 0.0
    if layout.expert > 1:
        # all-to-all of each token's top_k copies to its experts' ranks and back, in forward and backward (and the
        # forward again when the block is recomputed)
        ep, m = layout.expert, cfg.moe
        per_layer = 4 * (ep - 1) / ep * elem * T * m.top_k * cfg.d_model
        expert = len(cfg.moe_layers) * accum * per_layer * (1.5 if mode == "full" else 1.0)
    return {"data": data, "tensor": tensor, "sequence": sequence, "expert": expert}


@dataclass
class PlanRow:
    stage: int
    checkpointing: str
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    buffers_gb: float
    total_gb: float
    fits: bool
    tokens_per_s: float
    step_s: float
    hours_to_budget: float
    comm_gb: dict = dataclasses.field(default_factory=dict)  # per GPU and step: data / tensor / sequence


def planned_model(recipe: Recipe, vocab_size: Optional[int] = None) -> ModelConfig:
    """The recipe's model with its vocabulary (the recipe's, else the tokenizer's, else 32,000) and length resolved."""
    m = recipe.model
    return dataclasses.replace(
        m, vocab_size=m.vocab_size or vocab_size or 32000, max_seq_len=m.max_seq_len or recipe.data.seq_len
    )


def plan(
    recipe: Recipe,
    origin: str,
    gpus: int,
    gpu_memory_gb: float,
    peak_tflops: float = 989.0,
    mfu: float = 0.45,
    vocab_size: Optional[int] = None,
    fused_attention: bool = True,
) -> list[PlanRow]:
    """One row per ZeRO stage (0-3) × activation checkpointing (none, selective, full) for `gpus` GPUs of
    `gpu_memory_gb` each, in the recipe's parallel layout (tensor parallelism: ZeRO stages 0-2 only; bf16/fp16:
    stages 1-3, as training refuses stage 0 with them: config/deepspeed.py refused_stage)."""
    recipe, _ = resolve_precision(recipe, on_cpu=False)  # auto: what the GPUs will run
    cfg = planned_model(recipe, vocab_size)
    layout = make_layout(recipe, gpus, 0, origin)
    n_total, n_body = count_params(cfg)
    n_rank = params_per_rank(cfg, layout.tensor, layout.expert)
    t = recipe.train
    tokens_per_step = t.global_batch(layout.data) * recipe.data.seq_len
    budget = tokens_per_step * t.max_steps
    rows = []
    for stage in (0, 1, 2) if layout.tensor > 1 else (0, 1, 2, 3):
        if refused_stage(stage, t.precision):
            continue
        ds = compose_ds_config(recipe, layout.data, recipe.run_dir, origin, on_cpu=False)
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": stage}
        states = rank_state_bytes(cfg, layout, stage, t.precision)
        buffers = buffer_bytes(ds, n_rank)
        for mode in ("none", "selective", "full"):
            acts = activation_bytes(
                cfg,
                recipe.data.seq_len // layout.sequence,
                t.micro_batch_size,
                mode,
                fused_attention=fused_attention,
                elem=4 if t.precision == "fp32" else 2,
                loss_chunk=t.loss_chunk,
                compiled=t.compile,
                tensor=layout.tensor,
            )
            total = sum(states.values()) + acts + buffers
            comm = communication_bytes(
                cfg, layout, n_rank, stage, recipe.data.seq_len, t.micro_batch_size, t.grad_accum_steps, mode
            )
            fpt = flops_per_token(n_body - inactive_params(cfg), cfg, recipe.data.seq_len)
            recompute = {
                "none": 0.0,
                "selective": 12.0 * cfg.n_layers * cfg.d_model * recipe.data.seq_len / 3,
                "full": fpt / 3,
            }[mode]
            tps = mfu * peak_tflops * 1e12 * gpus / (fpt + recompute)
            rows.append(
                PlanRow(
                    stage,
                    mode,
                    states["params"] / GB,
                    states["grads"] / GB,
                    states["optimizer"] / GB,
                    acts / GB,
                    buffers / GB,
                    total / GB,
                    total <= gpu_memory_gb * GB * 0.95,
                    tps,
                    tokens_per_step / tps,
                    budget / tps / 3600,
                    {k: v / GB for k, v in comm.items()},
                )
            )
    return rows


def loss_chunk_hint(
    recipe: Recipe, vocab_size: Optional[int] = None, chunk: int = 2048, min_share: float = 0.2
) -> Optional[str]:
    """A line for the plan when train.loss_chunk is off and the logits are at least `min_share` of the activations
    (no checkpointing): how much a chunked LM head would save per GPU, and the compiled loss where it is off."""
    t = recipe.train
    if t.loss_chunk or t.micro_batch_size * recipe.data.seq_len <= chunk:
        return None
    cfg = planned_model(recipe, vocab_size)
    elem = 4 if t.precision == "fp32" else 2
    whole = activation_bytes(cfg, recipe.data.seq_len, t.micro_batch_size, "none", elem=elem, compiled=t.compile)
    saved = whole - activation_bytes(
        cfg, recipe.data.seq_len, t.micro_batch_size, "none", elem=elem, loss_chunk=chunk, compiled=t.compile
    )
    if saved < min_share * whole:
        return None
    line = (
        f"hint: train.loss_chunk: {chunk} would hold {saved / GB:.2f} GB less per GPU ({saved / whole:.0%} of the "
        f"activations without checkpointing: the logits and their gradients; each chunk's LM head is recomputed "
        f"in backward)"
    )
    if not t.compile:
        fused = whole - activation_bytes(cfg, recipe.data.seq_len, t.micro_batch_size, "none", elem=elem, compiled=True)
        line += f"; train.compile (fused loss, compiled blocks) {fused / GB:.2f} GB less"
    return line


def suggest_layout(
    recipe: Recipe,
    origin: str,
    gpus: int,
    gpu_memory_gb: float,
    vocab_size: Optional[int] = None,
    gpus_per_node: int = 8,
) -> Optional[tuple[int, int, PlanRow]]:
    """The layout to start from on `gpus` GPUs: (tensor, sequence, row) of the first that fits, trying fewer
    model-parallel ranks first (they cost communication on every block), then the row with the highest planned
    throughput (least recomputation), the least communication, the least memory. Tensor groups stay within
    `gpus_per_node`; only layouts the recipe's model can hold (whole heads per rank, seq_len divisible) are tried.
    None: nothing fits."""
    candidates = []
    for tp in (t for t in range(1, min(gpus, gpus_per_node) + 1) if gpus % t == 0 and gpus_per_node % t == 0):
        for sp in (s for s in range(1, gpus // tp + 1) if (gpus // tp) % s == 0):
            trial = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, tensor=tp, sequence=sp))
            try:
                check_layout(trial, gpus, 1, origin)
            except RecipeError:
                continue
            candidates.append((tp * sp, tp, sp, trial))
    for _, tp, sp, trial in sorted(candidates, key=lambda c: (c[0], c[1])):
        fitting = [r for r in plan(trial, origin, gpus, gpu_memory_gb, vocab_size=vocab_size) if r.fits]
        if fitting:
            return tp, sp, max(fitting, key=lambda r: (r.tokens_per_s, -sum(r.comm_gb.values()), -r.total_gb))
    return None


def format_plan(
    rows: list[PlanRow],
    n_params: int,
    gpus: int,
    gpu_memory_gb: float,
    layout: Optional[Layout] = None,
    active: Optional[int] = None,
) -> str:
    """The plan's table; `active`: parameters a token uses (an MoE model's), when fewer than n_params."""
    layout = layout or Layout(gpus)
    sizes = f"{n_params / 1e6:.1f}M parameters"
    if active is not None and active < n_params:
        sizes += f" ({active / 1e6:.1f}M active per token: FLOPs and time count these)"
    keys = ("data", "tensor", "sequence", "expert") if layout.expert > 1 else ("data", "tensor", "sequence")
    dims = " / ".join(keys)
    head = (
        f"{sizes}, {gpus} GPUs x {gpu_memory_gb:g} GB as {layout.describe()} "
        f"(fits: total <= 95% of memory; comm: GB sent per GPU and step, {dims})\n"
        "| ZeRO | ckpt | params GB | grads GB | optim GB | activ. GB | buffers GB | total GB | fits | tokens/s "
        "| step s | hours to budget | comm GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r.stage} | {r.checkpointing} | {r.params_gb:.2f} | {r.grads_gb:.2f} | {r.optimizer_gb:.2f} | "
        f"{r.activations_gb:.2f} | {r.buffers_gb:.2f} | {r.total_gb:.2f} | {'yes' if r.fits else 'NO'} | "
        f"{r.tokens_per_s:,.0f} | {r.step_s:.3f} | {r.hours_to_budget:.1f} | "
        f"{' / '.join(f'{r.comm_gb.get(k, 0.0):.2f}' for k in keys)} |"
        for r in rows
    ]
    return head + "\n".join(lines)
