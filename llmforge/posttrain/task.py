"""What SFT and DPO change in a training run: the starting weights and tokenizer (train.init_from + chat role
tokens), the data (conversations or preference pairs), LoRA, and for DPO the objective with cached reference
log-probabilities. Everything else — engine, schedule, guard, checkpoints, exact resume, preemption — is
pre-training's (llmforge/train/run.py)."""

from __future__ import annotations

import os
from typing import Any

from llmforge.config import Recipe
from llmforge.config.parallel import Layout
from llmforge.config.recipe import LoraConfig
from llmforge.data.stages import BatchRamp
from llmforge.errors import RecipeError
from llmforge.posttrain.data import PreferenceData, SFTData, split_records
from llmforge.posttrain.dpo import DPOLoss, reference_table
from llmforge.tokenizer.added import with_chat_tokens
from llmforge.train.checkpoint import ResumePoint
from llmforge.train.loading import starting_point
from llmforge.train.task import Task, TaskSetup
from llmforge.train.trainer import Objective, TaskData


class SFT(Task):
    """Supervised fine-tuning on conversations: loss on the assistant's tokens only."""

    name = "sft"
    data_class: type = SFTData

    def setup(self, recipe: Recipe, origin: str, resume: ResumePoint, zero_stage: int) -> TaskSetup:
        pt = recipe.posttrain
        if pt.lora.rank and zero_stage == 3:
            raise RecipeError(
                origin,
                "posttrain.lora.rank",
                "LoRA runs under ZeRO stage 0-2 (the adapters are small); use deepspeed.config: llmforge:zero2.json",
            )
        if recipe.parallel.sequence > 1:
            raise RecipeError(
                origin,
                "parallel.sequence",
                f"{self.name} runs without sequence parallelism (its rows are padded per micro-batch); set it to 1",
            )
        if not recipe.train.init_from:
            raise RecipeError(origin, "train.init_from", f"is required for {self.name}: the model to fine-tune")
        if recipe.data.stages:
            raise RecipeError(origin, "data.stages", f"staged mixtures are for pre-training; remove it for {self.name}")
        if not pt.train_file:
            raise RecipeError(origin, "posttrain.train_file", f"is required for {self.name}")
        for key in ("train_file", "val_file"):
            path = getattr(pt, key)
            if path and not os.path.isfile(path):
                raise RecipeError(origin, f"posttrain.{key}", f"file not found: {path}")
        recipe, init, tok = starting_point(recipe, origin, resume.path, with_chat_tokens)
        train_records, val_records = split_records(pt.train_file, pt.val_file, pt.val_fraction)
        seq_len, seed = recipe.data.seq_len, recipe.run.seed
        train = self.data_class(train_records, tok, seq_len, seed, "train")
        val = self.data_class(val_records, tok, seq_len, seed + 1, "val") if val_records else None
        return TaskSetup(recipe, tok, TaskData(train, val), init)

    def schedule_data(self, recipe: Recipe, data: TaskData, ramp: BatchRamp, origin: str) -> None:
        """Conversations are read in one seeded order (no stages)."""
        return None

    def lora(self, recipe: Recipe) -> LoraConfig:
        return recipe.posttrain.lora


class DPO(SFT):
    """Direct preference optimisation (or IPO) against the starting weights as the reference model."""

    name = "dpo"
    data_class = PreferenceData

    def setup(self, recipe: Recipe, origin: str, resume: ResumePoint, zero_stage: int) -> TaskSetup:
        setup = super().setup(recipe, origin, resume, zero_stage)
        if setup.recipe.model.moe.enabled:
            raise RecipeError(
                origin,
                "train.init_from",
                "is a mixture-of-experts model: DPO does not train one yet (its loss has no load-balancing term); "
                "fine-tune it with launch/sft.py",
            )
        return setup

    def objective(self, engine: Any, setup: TaskSetup, run_dir: str, layout: Layout, fresh: bool) -> Objective:
        recipe = setup.recipe
        d = recipe.posttrain.dpo
        table = reference_table(
            engine,
            setup.data.train,
            setup.data.val,
            os.path.join(run_dir, "dpo_reference.pt"),
            recipe.train.micro_batch_size,
            fresh=fresh,
            layout=layout,
        )
        loss = DPOLoss(table, d.beta, d.loss, d.label_smoothing)
        return Objective(loss, loss)


TASKS: dict[str, type[Task]] = {"pretrain": Task, "sft": SFT, "dpo": DPO}
