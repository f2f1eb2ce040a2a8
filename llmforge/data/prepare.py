"""`prepare_data`: plan work units for every source, process this shard's units (optionally on K worker processes),
then merge each dataset (global dedup + final shards + manifest). Reruns skip completed parts."""

from __future__ import annotations

from tqdm import tqdm
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional

from llmforge.config.data import SourceSpec
from llmforge.config.recipe import Recipe
from llmforge.data.dedup import load_eval_ngrams
from llmforge.data.indexed import token_dtype
from llmforge.data.merge import merge_dataset
from llmforge.data.pipeline import keep_reason, part_complete, process_unit, processing_key
from llmforge.data.sources import WorkUnit, read_unit, work_units
from llmforge.errors import DataError, RecipeError
from llmforge.tokenizer import Tokenizer, fingerprint, load_tokenizer, train_tokenizer_from_texts

log = logging.getLogger(__name__)


def shard_from_env() -> tuple[int, int]:
    """(index, count) of a slurm job array task, or (0, 1)."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def _require(recipe: Recipe, origin: str) -> str:
    if not recipe.data.sources:
        raise RecipeError(origin, "data.sources", "is empty: no raw corpora to prepare")
    if not recipe.data.prepared_dir:
        raise RecipeError(origin, "data.prepared_dir", "is required: where to write the prepared datasets")
    return recipe.data.prepared_dir


def work_plan(recipe: Recipe) -> list[tuple[SourceSpec, WorkUnit]]:
    d = recipe.data
    return [(spec, unit) for spec in d.sources for unit in work_units(spec, d.unit_files, d.unit_bytes)]


# Worker processes rebuild the heavy state once (tokenizer, evaluation n-grams) instead of pickling it per unit.
_WORKER: dict = {}


def _init_worker(recipe: Recipe, origin: str) -> None:
    _WORKER["tok"] = load_tokenizer(recipe.tokenizer, origin)
    _WORKER["ngrams"] = load_eval_ngrams(recipe.data.decontaminate)
    _WORKER["recipe"] = recipe
    _WORKER["fingerprint"] = fingerprint(_WORKER["tok"])


def _run_unit(args: tuple[SourceSpec, WorkUnit]) -> dict:
    spec, unit = args
    recipe = _WORKER["recipe"]
    out = os.path.join(recipe.data.prepared_dir, spec.name)
    key = processing_key(spec, recipe.data, _WORKER["fingerprint"])
    return process_unit(unit, spec, recipe.data, _WORKER["tok"], out, _WORKER["ngrams"], key)


def prepare(recipe: Recipe, origin: str, shard_index: Optional[int] = None, num_shards: Optional[int] = None,
            workers: int = 1, merge: Optional[bool] = None, progress: bool = True, only_merge: bool = False) -> dict:
    """Process shard `shard_index` of `num_shards` (default: from slurm, else all), then merge if asked (default:
    when this process handled every shard). Returns {dataset name: manifest} for merged datasets."""
    out = _require(recipe, origin)
    env_index, env_count = shard_from_env()
    index = env_index if shard_index is None else shard_index
    count = env_count if num_shards is None else num_shards
    if not 0 <= index < count:
        raise DataError(f"--shard-index {index} is outside 0..{count - 1}")
    tok = load_tokenizer(recipe.tokenizer, origin)
    units = work_plan(recipe)
    mine = [u for i, u in enumerate(units) if i % count == index]
    tok_fp = fingerprint(tok)
    todo = [] if only_merge else [(s, u) for s, u in mine
                                  if not part_complete(os.path.join(out, s.name), u, processing_key(s, recipe.data, tok_fp))]
    log.info("shard %d/%d: %d of %d work units, %d already complete", index, count, len(mine), len(units),
             len(mine) - len(todo))
    _run(todo, recipe, origin, workers, progress)
    if merge is None:
        merge = count == 1
    if not merge:
        return {}
    info = {"type": recipe.tokenizer.type, "fingerprint": fingerprint(tok), "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": token_dtype(tok.vocab_size).name}
    manifests = {}
    for spec in recipe.data.sources:
        spec_units = [u for s, u in units if s.name == spec.name]
        manifests[spec.name] = merge_dataset(spec, spec_units, os.path.join(out, spec.name), recipe.data, info)
    return manifests


def _run(todo: list[tuple[SourceSpec, WorkUnit]], recipe: Recipe, origin: str, workers: int, progress: bool) -> None:
    bar = tqdm(total=len(todo), unit="part", disable=not progress or not todo, dynamic_ncols=True)
    started, docs, nbytes = time.time(), 0, 0

    def done(stats: dict) -> None:
        nonlocal docs, nbytes
        docs += stats.get("read", 0)
        nbytes += stats.get("bytes", 0)
        elapsed = max(time.time() - started, 1e-9)
        bar.set_postfix_str(f"{docs / elapsed:.0f} docs/s, {nbytes / elapsed / 1e6:.2f} MB/s")
        bar.update()

    if workers <= 1:
        _init_worker(recipe, origin)
        for job in todo:
            done(_run_unit(job))
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(recipe, origin)) as pool:
            for stats in pool.map(_run_unit, todo):
                done(stats)
    bar.close()


def sample_texts(recipe: Recipe, origin: str) -> Iterator[str]:
    """Cleaned, filtered documents for tokenizer training: up to tokenizer.sample_bytes, shared across sources."""
    _require(recipe, origin)
    budget = recipe.tokenizer.sample_bytes // len(recipe.data.sources)
    for spec in recipe.data.sources:
        used, stats = 0, dict[str, int]()
        for unit in work_units(spec):
            for doc in read_unit(unit, spec, stats):
                text, reason = keep_reason(doc, spec, recipe.data, set())
                if reason is None:
                    yield text
                    used += len(text.encode("utf-8"))
                    if used >= budget:
                        break
            if used >= budget:
                break


def train_tokenizer(recipe: Recipe, origin: str) -> Tokenizer:
    """Train the recipe's tokenizer on a sample of its cleaned sources and save it to tokenizer.path."""
    return train_tokenizer_from_texts(recipe.tokenizer, sample_texts(recipe, origin), origin)
