"""`prepare_data`: plan work units for every source, process this shard's units (optionally on K worker processes),
then merge each dataset (global dedup + final shards + manifest). Reruns skip completed parts."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

from tqdm import tqdm

from llmforge.config.data import SourceSpec
from llmforge.config.recipe import Recipe
from llmforge.data.dedup import load_eval_ngrams
from llmforge.data.indexed import token_dtype
from llmforge.data.merge import merge_dataset
from llmforge.data.pipeline import document_pieces, part_complete, process_unit, processing_key
from llmforge.data.sources import WorkUnit, expand_paths, read_unit, work_units
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


def _init_worker(recipe: Recipe, origin: str, counter: Optional[Any] = None) -> None:
    _WORKER["counter"] = counter
    _WORKER["tok"] = load_tokenizer(recipe.tokenizer, origin)
    _WORKER["ngrams"] = load_eval_ngrams(recipe.data.decontaminate)
    _WORKER["recipe"] = recipe
    _WORKER["fingerprint"] = fingerprint(_WORKER["tok"])


def _run_unit(args: tuple[SourceSpec, WorkUnit]) -> dict:
    spec, unit = args
    recipe = _WORKER["recipe"]
    out = os.path.join(recipe.data.prepared_dir, spec.name)
    key = processing_key(spec, recipe.data, _WORKER["fingerprint"])
    return process_unit(unit, spec, recipe.data, _WORKER["tok"], out, _WORKER["ngrams"], key, _WORKER["counter"])


def prepare(
    recipe: Recipe,
    origin: str,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
    workers: int = 1,
    merge: Optional[bool] = None,
    progress: bool = True,
    only_merge: bool = False,
    report: Callable[[str], None] = log.info,
) -> dict:
    """Process shard `shard_index` of `num_shards` (default: from slurm, else all), then merge if asked (default:
    when this process handled every shard). Returns {dataset name: manifest} for merged datasets; `report` gets
    each merged dataset's summary lines. A source that keeps no document stops it (DataError naming its top drop
    reasons and their keys) once every dataset is merged."""
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
    todo = (
        []
        if only_merge
        else [
            (s, u)
            for s, u in mine
            if not part_complete(os.path.join(out, s.name), u, processing_key(s, recipe.data, tok_fp))
        ]
    )
    log.info(
        "shard %d/%d: %d of %d work units, %d already complete",
        index,
        count,
        len(mine),
        len(units),
        len(mine) - len(todo),
    )
    _run(todo, recipe, origin, workers, progress)
    if merge is None:
        merge = count == 1
    if not merge:
        return {}
    info = {
        "type": recipe.tokenizer.type,
        "fingerprint": fingerprint(tok),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": token_dtype(tok.vocab_size).name,
    }
    manifests = {}
    for spec in recipe.data.sources:
        spec_units = [u for s, u in units if s.name == spec.name]
        manifests[spec.name] = merge_dataset(spec, spec_units, os.path.join(out, spec.name), recipe.data, info)
        for line in dataset_report(spec.name, manifests[spec.name], out):
            report(line)
    empty = [name for name, m in manifests.items() if not m["stats"].get("kept")]
    if empty:
        raise DataError(
            "; ".join(
                f"data.sources[{name}] kept no documents: {_top_drops(manifests[name]['stats'])}" for name in empty
            )
        )
    return manifests


# The recipe key that controls each drop reason (the web and code rules each have a section of keys).
REASON_KEYS = {
    "empty": "data.min_chars",
    "too_long": "data.max_chars, data.chunk_chars",
    "contaminated": "data.decontaminate",
    "language": "data.sources[].languages, data.sources[].min_language_score",
    "exact_duplicate": "data.dedup.exact",
    "near_duplicate": "data.dedup.near, data.dedup.threshold",
    "file_too_large": "data.code_filters",
    "line_too_long": "data.code_filters",
    "mean_line_too_long": "data.code_filters",
    "low_alnum_fraction": "data.code_filters",
    "auto_generated": "data.code_filters",
}


def reason_key(reason: str) -> str:
    return REASON_KEYS.get(reason, "data.web_filters")


def _top_drops(stats: dict, n: int = 3) -> str:
    drops = sorted(
        ((v, k.removeprefix("dropped:")) for k, v in stats.items() if k.startswith("dropped:") and v), reverse=True
    )
    if not drops:
        return f"read {stats.get('read', 0)} documents, none dropped by a rule (no input text?)"
    shown = ", ".join(f"{v} {r} ({reason_key(r)})" for v, r in drops[:n])
    return f"read {stats.get('read', 0)} documents; dropped {shown}"


def _fractions(removed: dict[str, int], total: int, n: int = 4) -> str:
    top = sorted(((v, k) for k, v in removed.items() if v), reverse=True)
    shown = ", ".join(f"{k} {100 * v / total:.1f}%" for v, k in top[:n])
    return shown + (f", {len(top) - n} more" if len(top) > n else "")


def removed_bytes_lines(name: str, st: dict) -> list[str]:
    """What the rules did to a source, as fractions of its input bytes (the extracted or read text): one line by
    rule (line rules and document rules), then, for a source whose documents were identified, one line per language
    (its share of the input, the share that passed the rules, and what removed the rest), largest first."""
    total = st.get("bytes", 0)
    if not total:
        return []
    removed = {f"line:{k.split(':', 1)[1]}": v for k, v in st.items() if k.startswith("lines_removed_bytes:")}
    removed |= {k.split(":", 1)[1]: v for k, v in st.items() if k.startswith("dropped_bytes:")}
    out = []
    if any(removed.values()):
        # the rest: normalisation (spaces, control characters), so that the fractions add up
        removed["cleaning"] = max(0, total - st.get("passed_bytes", 0) - sum(removed.values()))
        share = 100 * sum(removed.values()) / total
        out.append(f"{name}: removed {share:.1f}% of {total} bytes: {_fractions(removed, total)}")
    langs = sorted(((v, k.split(":", 1)[1]) for k, v in st.items() if k.startswith("lang_bytes:")), reverse=True)
    for size, lang in langs[:8]:
        by_rule = {k.split(":", 2)[2]: v for k, v in st.items() if k.startswith(f"lang_dropped_bytes:{lang}:")}
        passed = st.get(f"lang_passed_bytes:{lang}", 0)
        by_rule["cleaning"] = max(0, size - passed - sum(by_rule.values()))
        out.append(
            f"{name} [{lang}]: {st.get(f'lang:{lang}', 0)} documents, {100 * size / total:.1f}% of the bytes; "
            f"{100 * passed / size:.1f}% passed the rules ({st.get(f'lang_kept:{lang}', 0)} documents kept after "
            f"dedup); removed: {_fractions(by_rule, size, 3)}"
        )
    if len(langs) > 8:
        out.append(f"{name}: {len(langs) - 8} more languages (manifest.json: lang_bytes:<xx>)")
    return out


def dataset_report(name: str, manifest: dict, prepared_dir: str) -> list[str]:
    """prepare's summary of one dataset: a line of counts, then a warning line for a source that kept nothing or
    lost most of its bytes (or documents, for dedup) to one rule."""
    st, splits = manifest["stats"], manifest["splits"]
    # documents longer than data.chunk_chars are cut into pieces before the rules: kept counts pieces then
    cut = f" ({st['chunked:documents']} cut into {st['chunked:pieces']} pieces)" if st.get("chunked:documents") else ""
    unit = "documents and pieces" if cut else "documents"
    lines = [
        f"{name}: read {st.get('read', 0)} documents{cut}, kept {st.get('kept', 0)} {unit}; "
        f"train {splits['train']['tokens']} tokens, val {splits['val']['tokens']} tokens "
        f"-> {os.path.join(prepared_dir, name)}"
    ]
    if not st.get("kept"):
        lines.append(f"WARNING {name}: kept no documents: {_top_drops(st)}")
        return lines
    read_bytes, read_docs = st.get("bytes", 0), st.get("read", 0)
    lines += removed_bytes_lines(name, st)
    for key, value in sorted(st.items()):
        if key.startswith("dropped_bytes:") and read_bytes and value > read_bytes / 2:
            reason = key.removeprefix("dropped_bytes:")
            lines.append(
                f"WARNING {name}: {100 * value / read_bytes:.0f}% of its bytes dropped as {reason} "
                f"({reason_key(reason)})"
            )
        if key in ("dropped:exact_duplicate", "dropped:near_duplicate") and read_docs and value > read_docs / 2:
            reason = key.removeprefix("dropped:")
            lines.append(
                f"WARNING {name}: {100 * value / read_docs:.0f}% of its documents dropped as {reason} "
                f"({reason_key(reason)})"
            )
    return lines


def _run(todo: list[tuple[SourceSpec, WorkUnit]], recipe: Recipe, origin: str, workers: int, progress: bool) -> None:
    """Process the work units (in `workers` processes when > 1) under a bar of the bytes and documents read so far,
    updated while units run (workers add to a shared counter)."""
    counter = multiprocessing.get_context("fork").Array("q", 2)  # bytes, documents read
    # A total where the text read is the files' bytes (plain text and code); other sources show a count and rates.
    plain = all(s.type in ("text", "code") and not any(f.endswith(".gz") for f in u.files) for s, u in todo)
    total = sum(os.path.getsize(f) for _, u in todo for f in u.files if os.path.isfile(f)) if plain else None
    bar = tqdm(
        total=total or None,
        unit="B",
        unit_scale=True,
        disable=not progress or not todo,
        dynamic_ncols=True,
        desc=f"prepare {len(todo)} units",
    )
    started = time.time()

    def show() -> None:
        nbytes, docs = int(counter[0]), int(counter[1])
        if bar.total is not None and nbytes > bar.total:
            bar.total = nbytes
        bar.update(nbytes - bar.n)
        bar.set_postfix_str(f"{docs} docs, {docs / max(time.time() - started, 1e-9):.0f} docs/s", refresh=False)

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.25):
            show()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        if workers <= 1:
            _init_worker(recipe, origin, counter)
            for job in todo:
                _run_unit(job)
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(recipe, origin, counter)
            ) as pool:
                list(pool.map(_run_unit, todo))
    finally:
        stop.set()
        poller.join()
        show()
        bar.close()


def sample_texts(recipe: Recipe, origin: str) -> Iterator[str]:
    """Cleaned, filtered documents for tokenizer training: up to tokenizer.sample_bytes, shared across sources."""
    _require(recipe, origin)
    budget = recipe.tokenizer.sample_bytes // len(recipe.data.sources)
    for spec in recipe.data.sources:
        used, stats = 0, dict[str, int]()
        for unit in work_units(spec):
            for doc in read_unit(unit, spec, stats):
                for text, reason in document_pieces(doc, spec, recipe.data, set()):
                    if reason is None:
                        yield text
                        used += len(text.encode("utf-8"))
                        if used >= budget:
                            break
                if used >= budget:
                    break
            if used >= budget:
                break


def train_tokenizer(recipe: Recipe, origin: str, progress: bool = True) -> Tokenizer:
    """Train the recipe's tokenizer on a sample of its cleaned sources and save it to tokenizer.path; `progress`
    shows a bar of the sample's bytes, then a line while the tokenizer trains."""
    _require(recipe, origin)
    on_disk = sum(os.path.getsize(f) for spec in recipe.data.sources for f in expand_paths(spec))
    bar = tqdm(
        total=min(recipe.tokenizer.sample_bytes, on_disk),
        unit="B",
        unit_scale=True,
        desc="tokenizer sample",
        disable=not progress,
        dynamic_ncols=True,
    )

    def sampled() -> Iterator[str]:
        for text in sample_texts(recipe, origin):
            bar.update(len(text.encode("utf-8")))
            yield text
        bar.close()
        if progress:
            size = tqdm.format_sizeof(bar.n, "B")
            tqdm.write(f"training the {recipe.tokenizer.type} tokenizer on {size} of cleaned text", file=sys.stderr)

    return train_tokenizer_from_texts(recipe.tokenizer, sampled(), origin)
