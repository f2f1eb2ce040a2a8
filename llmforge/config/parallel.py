"""The parallel layout: how a run's ranks split into tensor, sequence and data-parallel groups, and which layouts a
recipe can run (checked before anything starts).

Ranks are ordered tensor-fastest: rank = (data_rank × sequence + sequence_rank) × tensor + tensor_rank. A tensor
group is `tensor` consecutive ranks, so it sits inside one node (the launcher numbers a node's ranks consecutively);
a sequence group takes every tensor-th rank within one data-parallel replica; data-parallel replicas come last. This
is also DeepSpeed's AutoTP grouping (a (world/tensor, tensor) device mesh), whose "data-parallel" group (the ranks
with the same tensor rank) is then data × sequence: gradients are averaged and ZeRO shards over it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from llmforge.config.recipe import ModelConfig, Recipe
from llmforge.errors import RecipeError

# AutoTP's rules for llmforge's layer names (regular expressions over parameter names).
COLUMN_PARALLEL = [r".*\.attn\.w[qkv]\.weight$", r".*\.mlp\.(gate|up)\.weight$"]
ROW_PARALLEL = [r".*\.attn\.wo\.weight$", r".*\.mlp\.down\.weight$"]


def tensor_parallel_config(tensor: int) -> dict:
    """The DeepSpeed `tensor_parallel` section that shards llmforge's GPT over `tensor` ranks (AutoTP training)."""
    return {
        "autotp_size": tensor,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": COLUMN_PARALLEL, "partition_type": "column"},
                {"patterns": ROW_PARALLEL, "partition_type": "row"},
            ],
        },
    }


# AutoEP finds llmforge's MoE blocks by these names (the block may sit inside an activation-checkpoint wrapper).
MOE_LAYER_PATTERN = r"blocks\.\d+\.(?:_checkpoint_wrapped_module\.)?moe"


def expert_parallel_config(expert: int, cfg: ModelConfig) -> dict:
    """The DeepSpeed `expert_parallel` section (AutoEP) that splits llmforge's MoE blocks over `expert` ranks: the
    router `gate` and the stacked experts w1 (gate), w3 (up), w2 (down) named for it; softmax scores, top_k,
    renormalised (Mixtral's routing, as MoE.forward does)."""
    return {
        "enabled": True,
        "autoep_size": expert,
        "moe_layer_pattern": MOE_LAYER_PATTERN,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "w1",
        "expert_w2": "w2",
        "expert_w3": "w3",
        "num_experts_attr": "num_experts",
        "top_k_attr": "top_k",
        "score_func": "softmax",
        "route_norm": True,
        "top_k": cfg.moe.top_k,
        "use_grouped_mm": True,
    }


@dataclass(frozen=True)
class Layout:
    """A run's parallel layout, the one description every part reads: its dimensions (data, tensor, sequence,
    expert), every process group as rank tables (`groups()`), the groups themselves (`process_groups()`: llmforge's
    sequence groups built, DeepSpeed's tensor, data and expert groups checked against the tables after the engine
    built them), the DeepSpeed config sections it implies, what a checkpoint records of it, and its name in
    `llmforge parity`."""

    world: int
    tensor: int = 1
    sequence: int = 1
    rank: int = 0
    expert: int = 1  # expert-parallel ranks, inside the data-parallel replicas (consecutive replicas form a group)

    @property
    def data(self) -> int:
        """Data-parallel replicas: ranks that each read their own samples, divided by the model-parallel size."""
        return self.world // (self.tensor * self.sequence)

    @property
    def zero(self) -> int:
        """Ranks one ZeRO partition and gradient average spans: those with the same tensor rank (data x sequence)."""
        return self.world // self.tensor

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def sequence_rank(self) -> int:
        return (self.rank // self.tensor) % self.sequence

    @property
    def data_rank(self) -> int:
        return self.rank // (self.tensor * self.sequence)

    @property
    def counts_tokens(self) -> bool:
        """One rank per replica counts the replica's tokens (the others hold the same samples)."""
        return self.tensor_rank == 0 and self.sequence_rank == 0

    # -- process groups, as rank tables (every rank creates every group, in this order) --------------------------

    def tensor_groups(self) -> list[list[int]]:
        """AutoTP's tensor groups: `tensor` consecutive ranks."""
        return [list(range(start, start + self.tensor)) for start in range(0, self.world, self.tensor)]

    def sequence_groups(self) -> list[list[int]]:
        """Ulysses' sequence groups: every tensor-th rank within one data-parallel replica."""
        tp, sp = self.tensor, self.sequence
        return [[(d * sp + s) * tp + t for s in range(sp)] for d in range(self.data) for t in range(tp)]

    def data_groups(self) -> list[list[int]]:
        """DeepSpeed's data-parallel groups (gradients averaged, ZeRO partitions): the ranks with one tensor rank."""
        return [list(range(t, self.world, self.tensor)) for t in range(self.tensor)]

    def expert_groups(self) -> list[list[int]]:
        """AutoEP's expert-parallel groups (the all-to-all; each holds every expert once): `expert` consecutive
        ranks of a data-parallel group."""
        ep = self.expert
        return [g[i : i + ep] for g in self.data_groups() for i in range(0, len(g), ep)]

    def expert_data_groups(self) -> list[list[int]]:
        """AutoEP's expert-data-parallel groups (expert gradients averaged, expert ZeRO partitions): the ranks that
        hold the same experts, one from each expert group of a data-parallel group."""
        ep = self.expert
        return [g[pos::ep] for g in self.data_groups() for pos in range(ep)]

    def groups(self) -> dict[str, list[list[int]]]:
        """Every dimension's rank table, by name."""
        return {
            "tensor": self.tensor_groups(),
            "sequence": self.sequence_groups(),
            "data": self.data_groups(),
            "expert": self.expert_groups(),
            "expert_data": self.expert_data_groups(),
        }

    def mine(self, table: list[list[int]]) -> list[int]:
        """This rank's group in `table`."""
        return next(g for g in table if self.rank in g)

    def process_groups(self) -> ProcessGroups:
        """This rank's process groups before the engine exists: llmforge builds the sequence groups (DeepSpeed's
        Ulysses takes them as given); DeepSpeed builds the others at `deepspeed.initialize`, and
        `ProcessGroups.adopt_deepspeed()` then checks them against this layout's tables."""
        import torch.distributed as dist

        sequence = None
        if self.sequence > 1:
            for ranks in self.sequence_groups():
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    sequence = group
        return ProcessGroups(self, sequence)

    # -- DeepSpeed, checkpoints, parity ----------------------------------------------------------------------------

    def deepspeed_sections(self, model: ModelConfig) -> dict:
        """The DeepSpeed config sections this layout adds to a composed config: AutoTP's `tensor_parallel`, AutoEP's
        `expert_parallel` (sequence parallelism is llmforge's own wrapping; data parallelism is the default)."""
        sections = {}
        if self.tensor > 1:
            sections["tensor_parallel"] = tensor_parallel_config(self.tensor)
        if self.expert > 1:
            sections["expert_parallel"] = expert_parallel_config(self.expert, model)
        return sections

    def identity(self) -> dict:
        """What a checkpoint records of the layout (llmforge_state.json; a resume compares it)."""
        return {
            "world_size": self.world,
            "tensor_parallel": self.tensor,
            "sequence_parallel": self.sequence,
            "expert_parallel": self.expert,
        }

    @classmethod
    def from_identity(cls, saved: dict, default: Layout) -> Layout:
        """The layout a checkpoint was saved under (`default`'s sizes where an older checkpoint did not say)."""
        return cls(
            int(saved.get("world_size", default.world)),
            int(saved.get("tensor_parallel", 1)),
            int(saved.get("sequence_parallel", 1)),
            0,
            int(saved.get("expert_parallel", 1)),
        )

    @property
    def name(self) -> str:
        """The layout's name in `llmforge parity` ('1', 'dp2', 'tp2.sp2', 'ep2', ...): a size is named when it is
        not 1, and dpN when it is not implied (epN alone implies dpN)."""
        parts = [f"tp{self.tensor}"] * (self.tensor > 1) + [f"sp{self.sequence}"] * (self.sequence > 1)
        if self.data > 1 and self.data != self.expert:
            parts.append(f"dp{self.data}")
        parts += [f"ep{self.expert}"] * (self.expert > 1)
        return ".".join(parts) or "1"

    def recipe_sets(self) -> list[str]:
        """The --set overrides that put a recipe on this layout (its world size is the launcher's)."""
        return [
            f"parallel.tensor={self.tensor}",
            f"parallel.sequence={self.sequence}",
            f"parallel.expert={self.expert}",
        ]

    def describe(self) -> str:
        experts = f" (experts over {self.expert})" if self.expert > 1 else ""
        return f"data {self.data}{experts} x sequence {self.sequence} x tensor {self.tensor}"


@dataclass
class ProcessGroups:
    """A rank's process groups, one per dimension (None where the dimension has one rank, or before the engine
    built DeepSpeed's)."""

    layout: Layout
    sequence: Any = None
    tensor: Any = None
    data: Any = None
    expert: Any = None
    expert_data: Any = None

    def adopt_deepspeed(self, engine: Any) -> ProcessGroups:
        """Take the groups the engine reduces over (its data-parallel group: AutoTP's mesh or the world; AutoEP's
        expert and expert-data groups) and AutoTP's tensor group, after checking that each holds the ranks this
        layout's tables say: a DeepSpeed release that ordered ranks otherwise would average gradients over the wrong
        ranks without a word."""
        import torch.distributed as dist
        from deepspeed.utils import groups as ds

        lay = self.layout
        found: dict[str, Any] = {"data": engine.seq_data_parallel_group}
        if lay.tensor > 1:
            found["tensor"] = ds.get_tensor_model_parallel_group()
        if lay.expert > 1:
            name = f"ep_size_{lay.expert}"
            found["expert"] = engine.expert_parallel_group[name]
            found["expert_data"] = engine.expert_data_parallel_group[name]
        for dim, group in found.items():
            ranks = sorted(dist.get_process_group_ranks(group))
            want = lay.mine(lay.groups()[dim])
            if ranks != want:
                raise RuntimeError(
                    f"rank {lay.rank}: DeepSpeed's {dim} group holds ranks {ranks}, the layout's {want} "
                    f"({lay.describe()}): the rank order of this DeepSpeed release differs from llmforge's"
                )
            setattr(self, dim, group)
        return self


def make_layout(recipe: Recipe, world: int, rank: int, origin: str) -> Layout:
    """This rank's layout; the recipe's tensor x sequence must divide the ranks."""
    tp, sp = recipe.parallel.tensor, recipe.parallel.sequence
    if world % (tp * sp):
        raise RecipeError(
            origin, "parallel", f"tensor {tp} x sequence {sp} = {tp * sp} does not divide the {world} ranks"
        )
    return Layout(world, tp, sp, rank, recipe.parallel.expert)


def resolve_batch(recipe: Recipe, replicas: int, origin: str, saved_batch: Optional[int] = None) -> Recipe:
    """The recipe with train.grad_accum_steps derived so the global batch (sequences per optimizer step) is
    train.global_batch_size, or when that is unset and a checkpoint is resumed, the checkpoint's `saved_batch`:
    a change of layout or world size keeps it. Refused in one line when it cannot be kept exactly, or when an
    explicit train.grad_accum_steps (not 1) disagrees with it."""
    t = recipe.train
    per_micro = t.micro_batch_size * replicas
    explicit = t.global_batch_size is not None
    target = t.global_batch_size if explicit else saved_batch
    if target is None:
        return recipe
    key = "train.global_batch_size" if explicit else "train.grad_accum_steps"
    source = "" if explicit else " (the checkpoint's, kept on resume)"
    if t.grad_accum_steps != 1 and t.grad_accum_steps * per_micro != target:
        change = "" if explicit else f", or set train.global_batch_size={t.grad_accum_steps * per_micro} to change it"
        raise RecipeError(
            origin,
            key,
            f"train.grad_accum_steps={t.grad_accum_steps} x train.micro_batch_size={t.micro_batch_size} x {replicas} "
            f"data-parallel replicas = {t.grad_accum_steps * per_micro} sequences per step, but the global batch is "
            f"{target}{source}: leave train.grad_accum_steps at 1 (it is derived){change}",
        )
    if target % per_micro:
        fits = [m for m in range(1, target // replicas + 1) if target % replicas == 0 and (target // replicas) % m == 0]
        hint = (
            f"set train.micro_batch_size to one of {', '.join(map(str, fits))}"
            if fits
            else f"use a number of data-parallel replicas that divides {target}"
        )
        raise RecipeError(
            origin,
            key if explicit else "train.micro_batch_size",
            f"a global batch of {target} sequences{source} is not a whole number of micro-batches of "
            f"train.micro_batch_size={t.micro_batch_size} x {replicas} data-parallel replicas: {hint}",
        )
    return dataclasses.replace(recipe, train=dataclasses.replace(t, grad_accum_steps=target // per_micro))


def check_layout(recipe: Recipe, world: int, zero_stage: int, origin: str, ranks_per_node: int = 0) -> None:
    """Refuse, in one line naming the recipe key, a layout this run cannot hold. `ranks_per_node` 0: not checked."""
    p, m = recipe.parallel, recipe.model
    tp, sp = p.tensor, p.sequence
    layout = make_layout(recipe, world, 0, origin)
    if p.expert > 1:
        check_expert_layout(recipe, layout, zero_stage, origin)
    if m.moe.enabled and sp > 1:
        # each sequence rank would balance its slice's tokens: another objective than one rank's
        raise RecipeError(
            origin,
            "parallel.sequence",
            "sequence parallelism is not yet checked with mixture-of-experts blocks (model.moe); use "
            "parallel.sequence: 1 (tensor and expert parallelism work)",
        )
    if tp > 1:
        if zero_stage == 3:
            raise RecipeError(
                origin,
                "parallel.tensor",
                "tensor parallelism (DeepSpeed AutoTP) runs with ZeRO stages 0-2; use zero_optimization.stage <= 2",
            )
        for key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
            if heads % tp:
                raise RecipeError(
                    origin,
                    "parallel.tensor",
                    f"{key}={heads} is not divisible by tensor={tp}: each tensor rank holds whole heads",
                )
        if m.ff_dim % tp:
            raise RecipeError(origin, "parallel.tensor", f"the MLP width {m.ff_dim} is not divisible by tensor={tp}")
        if recipe.posttrain.lora.rank:
            raise RecipeError(
                origin, "parallel.tensor", "LoRA adapters are not tensor-parallel; use parallel.tensor: 1 with LoRA"
            )
        if ranks_per_node and (tp > ranks_per_node or ranks_per_node % tp):
            raise RecipeError(
                origin,
                "parallel.tensor",
                f"tensor groups stay inside a node: tensor={tp} must divide the {ranks_per_node} ranks per node",
            )
    if sp > 1:
        if recipe.data.seq_len % sp:
            raise RecipeError(
                origin, "parallel.sequence", f"data.seq_len={recipe.data.seq_len} is not divisible by sequence={sp}"
            )
        q = m.n_heads // tp  # per tensor rank; key/value heads are repeated as needed (model/parallel.py)
        if q % sp:
            per = f"the {q} query heads per tensor rank" if tp > 1 else f"model.n_heads={m.n_heads}"
            raise RecipeError(
                origin,
                "parallel.sequence",
                f"{per} are not divisible by sequence={sp}: Ulysses attention gives each sequence rank whole heads",
            )


def check_expert_layout(recipe: Recipe, layout: Layout, zero_stage: int, origin: str) -> None:
    """What expert parallelism (DeepSpeed AutoEP) needs, each refused in one line naming the key."""
    m, ep = recipe.model.moe, layout.expert
    key = "parallel.expert"
    if not m.enabled:
        raise RecipeError(origin, key, f"{ep} needs mixture-of-experts blocks (model.moe.num_experts > 0)")
    if m.num_experts % ep:
        raise RecipeError(origin, key, f"{ep} does not divide model.moe.num_experts={m.num_experts}")
    if layout.data % ep:
        raise RecipeError(
            origin, key, f"{ep} does not divide the {layout.data} data-parallel replicas (experts split over them)"
        )
    if m.capacity_factor is not None:
        raise RecipeError(
            origin, key, "expert parallelism (DeepSpeed AutoEP) routes dropless; set model.moe.capacity_factor: null"
        )
    if m.shared_experts:
        raise RecipeError(origin, key, "shared experts are not yet checked with expert parallelism; use expert: 1")
    if zero_stage == 0:
        raise RecipeError(
            origin, key, "expert parallelism runs under ZeRO stages 1-3; use deepspeed.config: llmforge:zero1.json"
        )
    if recipe.posttrain.lora.rank:
        raise RecipeError(
            origin, key, "LoRA freezes the experts (adapters go on attention and dense MLPs); use parallel.expert: 1"
        )
    if layout.tensor > 1:
        raise RecipeError(
            origin, key, "expert with tensor parallelism is not yet checked; use one of them (parallel.tensor: 1)"
        )


def ranks_per_node() -> int:
    """Ranks the launcher started on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE, or under srun
    SLURM_NTASKS_PER_NODE (train/distributed.py copies it); 0 when none says."""
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 0)
