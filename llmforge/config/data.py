"""Data-section configs: raw sources, cleaning filters, dedup, decontamination, prepared datasets."""

from __future__ import annotations

import functools
import importlib
import os
import re
from dataclasses import dataclass
from typing import Literal, Optional, Union

from llmforge.config.recipe_base import ConfigError, doc, positive

SOURCE_TYPES = ("text", "html", "warc", "code", "latex", "jsonl", "parquet")


# C4's terminal punctuation, plus ':' (ends lines introducing a list or a code block) and other scripts' full stops:
# the rule's characters for a recipe that turns it on (line_filters.terminal_punctuation)
C4_TERMINAL_PUNCTUATION = ".!?\"'”’:。！？।۔؟။།។"
_EXTRACTOR_MODULES = {"trafilatura": "trafilatura", "resiliparse": "resiliparse.extract.html2text"}


@functools.cache
def extractor_problem(name: str) -> Optional[str]:
    """Why the HTML extractor cannot run in this environment (its import fails), or None."""
    try:
        importlib.import_module(_EXTRACTOR_MODULES[name])
    except ImportError as e:
        reason = " ".join(str(e).split())
        return (
            f"{name} cannot be imported ({reason}); reinstall llmforge (`pip install -e .`) or pick the other extractor"
        )
    return None


@dataclass
class SourceSpec:
    name: Optional[str] = doc(
        None,
        "Dataset name; its shards go to <prepared_dir>/<name>/. Default: the source type (text, warc, ...), with "
        "-2, -3 ... added when several sources share a type.",
    )
    type: Literal["text", "html", "warc", "code", "latex", "jsonl", "parquet"] = doc(
        "text", "Reader: text | html | warc | code (tree or JSONL) | latex (.tex or tarballs) | jsonl | parquet."
    )
    paths: list[str] = doc(text="Local files, directories or globs (** recursive).", factory=list)
    text_field: str = doc("text", "jsonl/parquet (and code JSONL): field holding the document text.")
    quality: Optional[Literal["web", "code", "none"]] = doc(
        None, "Quality filters: web (Gopher/C4 heuristics), code, or none; null picks by type."
    )
    weight: float = doc(1.0, "Blend weight when data.datasets is not given.")
    extractor: Literal["trafilatura", "resiliparse"] = doc(
        "trafilatura",
        "html/warc main-text extractor: trafilatura, or resiliparse (about 10x faster, leaks more boilerplate). "
        "Measured on 750 real pages of 5 kinds in 14 languages (bench/results/html_extraction.md): on 83 web pages "
        "trafilatura finds 95.4% of the main-text snippets and leaks 0.4% of the boilerplate ones, resiliparse 91.1% "
        "and 23.5%.",
    )

    line_filters: Optional[LineFilters] = doc(
        None,
        "This source's line rules, replacing data.line_filters for it (e.g. C4's terminal-punctuation rule, "
        '`terminal_punctuation: ".!?\\"\'”’:"`, for a documentation site read with resiliparse, which '
        "writes one paragraph per line: there it keeps more of the main text; bench/results/html_extraction.md).",
    )
    languages: Union[Literal["all"], list[str]] = doc(
        "all",
        "Languages kept: all, or a list of fastText lid.176 labels (en, de, zh, ...). Every html/warc document is "
        "identified either way (its language decides the stop words and word rules; the manifest counts lang:<xx>); "
        "other sources are identified only when this is a list. Documents of other languages are dropped as "
        "`language`.",
    )
    min_language_score: float = doc(
        0.65, "With a languages list: lowest probability of the identified language for a document to be kept."
    )

    def __post_init__(self) -> None:
        if self.languages != "all":
            listed = self.languages if isinstance(self.languages, list) else [self.languages]
            bad = [x for x in listed if not (isinstance(x, str) and re.fullmatch(r"[a-z]{2,3}", x))]
            if bad or not listed or not isinstance(self.languages, list):
                raise ConfigError(
                    "languages", f"must be all or a non-empty list of language labels (en, de, zh, ...), got {bad}"
                )
        if not 0 <= self.min_language_score <= 1:
            raise ConfigError("min_language_score", f"must be in [0, 1], got {self.min_language_score}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError("name", f"must be a plain name (letters, digits, _ . -), got {self.name!r}")
        if not self.paths:
            raise ConfigError("paths", "must list at least one file, directory or glob")
        positive(self, "weight")
        if self.type in ("html", "warc"):
            problem = extractor_problem(self.extractor)
            if problem:
                raise ConfigError("extractor", problem)

    @property
    def identifies_language(self) -> bool:
        """Whether each document's language is identified: always for web pages, else when languages are chosen."""
        return self.type in ("html", "warc") or self.languages != "all"

    @property
    def quality_kind(self) -> str:
        if self.quality is not None:
            return self.quality
        return {"code": "code", "html": "web", "warc": "web"}.get(self.type, "none")


@dataclass
class WebFilters:
    """Document rules for web-like text, after the line rules: Gopher's quality and repetition rules (Rae et al.
    2021, appendix A, as datatrove implements them), C4's document rules (Raffel et al. 2020) and FineWeb's (Penedo
    et al. 2024); a null threshold (or false) turns a rule off."""

    min_words: Optional[int] = doc(50, "Gopher: fewest words.")
    max_words: Optional[int] = doc(100_000, "Gopher: most words.")
    min_mean_word_length: Optional[float] = doc(3.0, "Gopher: lowest mean word length (characters).")
    max_mean_word_length: Optional[float] = doc(10.0, "Gopher: highest mean word length.")
    max_symbol_word_ratio: Optional[float] = doc(0.1, "Gopher: most '#' and '...' per word.")
    max_bullet_lines: Optional[float] = doc(0.9, "Gopher: largest fraction of lines starting with a bullet.")
    max_ellipsis_lines: Optional[float] = doc(0.3, "Gopher: largest fraction of lines ending with an ellipsis.")
    min_alpha_words: Optional[float] = doc(0.8, "Gopher: smallest fraction of words with an alphabetic character.")
    min_stop_words: Optional[int] = doc(2, "Gopher: fewest of the stop words the, be, to, of, and, that, have, with.")
    max_duplicate_lines: Optional[float] = doc(0.3, "Gopher: largest fraction of lines equal to an earlier line.")
    max_duplicate_line_chars: Optional[float] = doc(
        0.2, "Gopher: largest fraction of characters in lines equal to an earlier line."
    )
    max_duplicate_paragraphs: Optional[float] = doc(
        0.3, "Gopher: largest fraction of paragraphs (split at blank lines) equal to an earlier paragraph."
    )
    max_duplicate_paragraph_chars: Optional[float] = doc(
        0.2, "Gopher: largest fraction of characters in paragraphs equal to an earlier paragraph."
    )
    max_top_ngram_chars: Optional[dict[int, float]] = doc(
        text="Gopher: per n, largest fraction of characters in the most frequent word n-gram (all its occurrences).",
        factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
    )
    max_duplicate_ngram_chars: Optional[dict[int, float]] = doc(
        text="Gopher: per n, largest fraction of characters in word n-grams that repeat an earlier n-gram (first "
        "occurrences and overlaps not counted).",
        factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
    )
    lorem_ipsum: bool = doc(True, "C4: drop pages containing 'lorem ipsum'.")
    curly_bracket: bool = doc(True, "C4: drop pages containing '{' (code and templates in web pages).")
    min_sentences: Optional[int] = doc(5, "C4: fewest sentences left after the line rules.")
    min_punct_line_fraction: Optional[float] = doc(
        0.12, "FineWeb: smallest fraction of lines ending in terminal punctuation."
    )
    max_short_line_fraction: Optional[float] = doc(
        0.67, "FineWeb: largest fraction of lines of 30 characters or fewer."
    )
    max_newline_word_ratio: Optional[float] = doc(0.3, "FineWeb: most line breaks per word (list-like pages).")
    max_repeated_line_chars: Optional[float] = doc(
        0.01, "FineWeb: largest fraction of characters (line breaks not counted) in lines equal to an earlier line."
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "min_words",
            "max_words",
            "min_mean_word_length",
            "max_mean_word_length",
            "min_stop_words",
            "min_sentences",
            allow_zero=True,
        )
        for name in ("max_top_ngram_chars", "max_duplicate_ngram_chars"):
            table = getattr(self, name)
            for n, frac in (table or {}).items():
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise ConfigError(name, f"keys are n-gram sizes (integers >= 1), got {n!r}")
                if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                    raise ConfigError(f"{name}.{n}", f"must be a fraction in (0, 1], got {frac!r}")


@dataclass
class LineFilters:
    """C4's line rules (Raffel et al. 2020, as datatrove's C4QualityFilter applies them) for web-like text: lines
    that fail one are removed before the document rules run, and counted per rule in the manifest
    (`lines_removed:<rule>`)."""

    min_words: Optional[int] = doc(3, "Remove lines of fewer words ('Share article', 'Advertisement').")
    terminal_punctuation: str = doc(
        "",
        "Remove lines that do not end in one of these characters, or that end in an ellipsis; '' (the default) "
        "turns the rule off, as FineWeb does (its document rule web_filters.min_punct_line_fraction judges the share "
        "of punctuated lines instead). C4's rule is `.!?\"'”’` (add ':' for lines introducing a list, and "
        "`。！？।۔؟။།។` for other scripts); with trafilatura, which keeps a paragraph's own line "
        "breaks, it cut the main text found in 83 real web pages from 95.4% to 73.8% and in the Python "
        "documentation from 97.8% to 37.8% (bench/results/html_extraction.md). Skipped for Thai and Lao, which end "
        "sentences with a space.",
    )
    max_word_length: Optional[int] = doc(1000, "Remove lines holding a longer word.")
    javascript: bool = doc(True, "Remove lines mentioning javascript ('Please enable JavaScript').")
    policy: bool = doc(True, "Remove lines about cookies, privacy policies and terms of use.")
    citations: bool = doc(True, "Delete Wikipedia-style citation marks ([1], [edit], [citation needed]) in lines.")

    def __post_init__(self) -> None:
        positive(self, "min_words", "max_word_length", allow_zero=True)


@dataclass
class CodeFilters:
    """The Stack / StarCoder-style code file filters."""

    max_bytes: int = doc(1_000_000, "Largest file in bytes.")
    max_line_length: int = doc(1000, "Longest line.")
    max_mean_line_length: float = doc(100.0, "Highest mean line length.")
    min_alnum_fraction: float = doc(0.25, "Smallest fraction of alphanumeric characters.")
    drop_generated: bool = doc(True, 'Drop files marked auto-generated ("generated by", "do not edit", ...).')

    def __post_init__(self) -> None:
        positive(self, "max_bytes", "max_line_length", "max_mean_line_length")


@dataclass
class DedupConfig:
    exact: bool = doc(True, "Drop documents whose normalised text hash was seen before (across all workers).")
    near: bool = doc(True, "Drop near-duplicates found by MinHash LSH over all workers' signatures.")
    ngram: int = doc(5, "Word n-gram size of the MinHash shingles.")
    num_perm: int = doc(128, "MinHash permutations.")
    threshold: float = doc(0.8, "Estimated Jaccard similarity above which a document is a near-duplicate.")

    def __post_init__(self) -> None:
        positive(self, "ngram", "num_perm")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold", f"must be in (0, 1), got {self.threshold}")


@dataclass
class DecontamConfig:
    paths: list[str] = doc(
        text="Evaluation files (text or JSONL) whose long n-grams must not appear in training.", factory=list
    )
    ngram: int = doc(13, "Word n-gram length that counts as contamination.")
    text_fields: list[str] = doc(
        text="JSONL fields read from evaluation files.",
        factory=lambda: ["text", "question", "answer", "prompt", "completion"],
    )

    def __post_init__(self) -> None:
        positive(self, "ngram")


@dataclass
class DatasetSpec:
    path: str = doc(None, "Prepared dataset directory (shards + manifest.json).")
    weight: float = doc(1.0, "Relative sampling weight in the blend.")
    name: Optional[str] = doc(
        None, "What data.stages[].weights and the per-source token counts call it; null = the directory's name."
    )

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("path", "is required")
        positive(self, "weight")
        if self.name is None:
            self.name = os.path.basename(os.path.normpath(self.path))


@dataclass
class StageSpec:
    """One stage of a staged data mixture (data.stages)."""

    name: Optional[str] = doc(None, "Shown in metrics.jsonl's stage events; null = stage<N> (1-based).")
    steps: Optional[int] = doc(None, "Optimizer steps of this stage (or give tokens).")
    tokens: Optional[int] = doc(
        None,
        "Training tokens of this stage (sequences x data.seq_len): the stage ends at the first step boundary at or "
        "past them.",
    )
    weights: dict[str, float] = doc(
        text="Blend weight per dataset name (data.datasets[].name) in this stage; a dataset not named is not read "
        "in it. Empty = the datasets' own weights.",
        factory=dict,
    )
    lr_decay: bool = doc(
        False,
        "train.schedule wsd: the learning rate decays linearly to train.min_lr over this stage (an anneal) "
        "instead of over train.decay_fraction of train.max_steps. At most one stage, the last.",
    )

    def __post_init__(self) -> None:
        positive(self, "steps", "tokens")
        if self.steps is not None and self.tokens is not None:
            raise ConfigError("steps", "give steps or tokens, not both")
        for key, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"weights.{key}", f"must be a number >= 0, got {weight!r}")
        if self.weights and not any(self.weights.values()):
            raise ConfigError("weights", "every weight is 0: the stage would read nothing")


@dataclass
class DataConfig:
    sources: list[SourceSpec] = doc(text="Raw corpora read by `prepare_data`, one prepared dataset each.", factory=list)
    prepared_dir: Optional[str] = doc(None, "Where `prepare_data` writes <name>/ datasets.")
    datasets: list[DatasetSpec] = doc(
        text="Prepared datasets to train on; empty = every source's dataset, weighted by its weight.", factory=list
    )
    seq_len: int = doc(256, "Tokens per training sample (context length).")
    val_fraction: float = doc(0.01, "Fraction of documents (by content hash) held out for validation.")
    line_filters: LineFilters = doc(text="Line rules for web-like text.", factory=LineFilters)
    web_filters: WebFilters = doc(text="Quality heuristics for web-like text.", factory=WebFilters)
    code_filters: CodeFilters = doc(text="Filters for source code files.", factory=CodeFilters)
    dedup: DedupConfig = doc(text="Exact and near-duplicate removal.", factory=DedupConfig)
    decontaminate: DecontamConfig = doc(text="Evaluation-set n-gram decontamination.", factory=DecontamConfig)
    chunk_chars: int = doc(
        65536,
        "Plain-text documents (text files, LaTeX, JSONL/Parquet records) longer than this "
        "are cut at line breaks into pieces of about this many characters, each assigned "
        "to train or val on its own, so one large file still yields a validation split; "
        "0 = never cut.",
    )
    min_chars: int = doc(1, "Documents shorter than this (after cleaning) are dropped.")
    max_chars: int = doc(
        5_000_000,
        "Documents longer than this are dropped (counted as too_long); plain-text documents are cut into "
        "data.chunk_chars pieces first, and this applies to each piece.",
    )
    shard_tokens: int = doc(1 << 30, "Tokens per output shard file before a new one is started.")
    unit_files: int = doc(2000, "Small input files grouped into one work unit (the unit of sharding and restart).")
    unit_bytes: int = doc(64 << 20, "Input bytes per work unit; a larger file is a unit of its own.")
    verify_mb: float = doc(
        256,
        "Training checks every shard file's size and index header against the manifest when it opens a dataset, "
        "and also its sha256 when the split's files total at most this many MB (every rank, before the first "
        "step); 0 = sizes and headers only. `llmforge verify-data DIR` checks everything.",
    )
    allow_fingerprint_change: bool = doc(False, "Resume even if the datasets' fingerprint changed.")
    prefetch: int = doc(
        2,
        "Training micro-batches read ahead on a background thread (pinned for an asynchronous "
        "copy on GPU); 0 reads each one inside the step.",
    )
    stages: list[StageSpec] = doc(
        text="A staged mixture: stages in order, each with a length and dataset weights (e.g. a long stage of web "
        "and code, then an anneal that up-weights curated data). Every stage but the last needs steps or tokens; "
        "the last runs to train.max_steps (given a length, it must end there). Empty: one stage, the datasets' "
        "weights.",
        factory=list,
    )

    def __post_init__(self) -> None:
        positive(self, "seq_len", "max_chars", "shard_tokens", "unit_files", "unit_bytes")
        positive(self, "min_chars", "prefetch", "chunk_chars", "verify_mb", allow_zero=True)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        taken = {s.name for s in self.sources if s.name}
        for source in self.sources:  # unnamed: named after the type, made unique
            if source.name is None:
                name: str = source.type
                n = 1
                while name in taken:
                    n += 1
                    name = f"{source.type}-{n}"
                source.name = name
                taken.add(name)
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError("sources", f"source names must be unique; repeated: {', '.join(sorted(dup))}")
        names = [d.name for d in self.datasets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError("datasets", f"names must be unique (set name:); repeated: {', '.join(sorted(dup))}")
        for i, stage in enumerate(self.stages):
            if stage.name is None:
                stage.name = f"stage{i + 1}"
            if i < len(self.stages) - 1 and stage.steps is None and stage.tokens is None:
                raise ConfigError(f"stages[{i}]", "needs steps or tokens (only the last stage may run to the end)")
            if stage.lr_decay and i != len(self.stages) - 1:
                raise ConfigError(f"stages[{i}].lr_decay", "only the last stage can be the decay (anneal) stage")
            known = [d.name for d in self.dataset_dirs()]
            for key in stage.weights:
                if known and key not in known:
                    raise ConfigError(
                        f"stages[{i}].weights.{key}", f"no dataset of that name; the datasets are {', '.join(known)}"
                    )

    def dataset_dirs(self) -> list[DatasetSpec]:
        """The datasets to train on: data.datasets, else one per source under prepared_dir."""
        if self.datasets:
            return self.datasets
        if self.prepared_dir:
            return [DatasetSpec(os.path.join(self.prepared_dir, s.name), s.weight) for s in self.sources]
        return []
