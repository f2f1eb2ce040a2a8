"""What differs between training tasks, behind one small interface: pre-training here; SFT and DPO in
llmforge/posttrain/task.py. `run_training` does everything else (engine, loop, checkpoints, resume) the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from llmforge.config import Recipe
from llmforge.config.parallel import Layout
from llmforge.config.recipe import LoraConfig
from llmforge.data.loader import PretrainData
from llmforge.data.stages import BatchRamp, StagePlan
from llmforge.errors import DataError, RecipeError
from llmforge.model.gpt import GPT
from llmforge.tokenizer import Tokenizer, fingerprint, load_tokenizer
from llmforge.train.checkpoint import ResumePoint
from llmforge.train.loading import starting_point
from llmforge.train.trainer import Objective, TaskData


@dataclass
class TaskSetup:
    """What a task builds before the engine exists."""

    recipe: Recipe  # with the model section resolved (vocabulary, context length, or the starting model's)
    tokenizer: Tokenizer
    data: TaskData
    init_weights: Optional[GPT] = None  # weights to start from (init_from, fresh runs only)


class Task:
    """Pre-training: the recipe's tokenizer and prepared shards, a random init or train.init_from (continued
    pre-training), next-token cross-entropy."""

    name = "pretrain"

    def setup(self, recipe: Recipe, origin: str, resume: ResumePoint, zero_stage: int) -> TaskSetup:
        tok = load_tokenizer(recipe.tokenizer, origin)
        tok_fp = fingerprint(tok)
        init = None
        if recipe.train.init_from:
            recipe, init, init_tok = starting_point(recipe, origin, resume.path)
            if fingerprint(init_tok) != tok_fp:
                raise RecipeError(
                    origin,
                    "train.init_from",
                    f"{recipe.train.init_from} uses tokenizer "
                    f"{fingerprint(init_tok)}, the recipe's tokenizer is "
                    f"{tok_fp}; point tokenizer.path at the model's tokenizer",
                )
        else:
            recipe = resolve_model_config(recipe, tok.vocab_size, origin)
        specs, seq_len, seed = recipe.data.dataset_dirs(), recipe.data.seq_len, recipe.run.seed
        verify = recipe.data.verify_mb
        train = PretrainData(specs, seq_len, seed, "train", tok_fp, verify)
        val = PretrainData(specs, seq_len, seed + 1, "val", tok_fp, verify)
        if recipe.eval.interval and val.num_samples == 0:
            raise DataError(
                f"eval.interval is {recipe.eval.interval} but the val split of "
                f"{', '.join(s.path for s in specs)} has no sample of seq_len+1={seq_len + 1} "
                f"tokens: prepare it with data.val_fraction > 0, or set eval.interval: 0"
            )
        sources = {}
        if recipe.eval.per_source and len(specs) > 1:
            for spec in specs:
                own = PretrainData([spec], seq_len, seed + 1, "val", tok_fp, verify)
                if own.num_samples:
                    sources[own.names[0]] = own
        return TaskSetup(recipe, tok, TaskData(train, val, sources), init)

    def schedule_data(
        self, recipe: Recipe, data: TaskData, ramp: BatchRamp, origin: str
    ) -> Optional[Callable[[Optional[int]], list]]:
        """Put the training split in the recipe's data stages (data.stages; one stage of the datasets' weights when
        there are none), at step boundaries of `ramp`. Returns what decides the first n samples (checkpoints record
        it, and a resume compares it)."""
        train, d = data.train, recipe.data
        try:
            plan = StagePlan.build(d.stages, train.names, train.weights, d.seq_len, recipe.train.max_steps, ramp)
        except ValueError as e:
            raise RecipeError(origin, "data.stages", str(e)) from None
        train.use_stages(plan)
        return lambda before: plan.describe(train.names, train.fingerprints, recipe.run.seed, before)

    def lora(self, recipe: Recipe) -> LoraConfig:
        """The LoRA adapters to train (rank 0: none; pre-training trains every weight)."""
        return LoraConfig()

    def objective(self, engine: Any, setup: TaskSetup, run_dir: str, layout: Layout, fresh: bool) -> Objective:
        """The loss, once the engine exists (DPO scores its reference pairs with it)."""
        masked = setup.recipe.model.attention_mask == "document"
        return Objective.language_modeling(setup.recipe.train, layout, setup.tokenizer.eos_id if masked else None)


def resolve_model_config(recipe: Recipe, vocab_size: int, origin: str) -> Recipe:
    """Fill model.vocab_size / max_seq_len from the tokenizer and data when the recipe leaves them null."""
    m = recipe.model
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise RecipeError(origin, "model.vocab_size", f"{m.vocab_size} is below the tokenizer's {vocab_size}")
    model = dataclasses.replace(
        m, vocab_size=m.vocab_size or vocab_size, max_seq_len=m.max_seq_len or recipe.data.seq_len
    )
    return dataclasses.replace(recipe, model=model)
