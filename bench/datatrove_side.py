"""The peer's side of bench/html_extraction.py, run by the Python of an environment where datatrove is installed
(it is not an llmforge dependency):

    python -m venv /tmp/dt && /tmp/dt/bin/pip install "datatrove[processing]==0.10.1" faust-cchardet python-magic \
        orjson warcio lxml_html_clean spacy aiohttp requests
    python bench/html_extraction.py --datatrove-python /tmp/dt/bin/python

Two modes:
- `datatrove_side.py` (pages): reads a JSON list of HTML file paths on stdin and writes one JSON line per page:
  datatrove's default web pipeline as FineWeb runs it — Trafilatura(favour_precision=True) → GopherRepetitionFilter
  → GopherQualityFilter → C4QualityFilter(filter_no_terminal_punct=False) → FineWebQualityFilter, all with their
  defaults — the extracted text, the final text (null when a filter drops the page), the filter that dropped it and
  the extraction time.
- `datatrove_side.py pipeline WARC_DIR WORK_DIR TOKENIZER_DIR LID_MODEL` (bench/data_pipeline.py): WARC → shards
  with the stages llmforge's prepare runs, laid out as datatrove's MinHash example does, one task and one worker
  each: WarcReader → Trafilatura → LanguageFilter (fastText lid.176, label_only: every document labelled, none
  dropped, as llmforge's `languages: all`; LID_MODEL, the model file llmforge uses, is put where datatrove caches
  the one it would download) → GopherRepetitionFilter → GopherQualityFilter → JsonlWriter; MinhashDedupSignature
  (sha1: datatrove's xxhash default breaks with xxhash 4), Buckets, Cluster; JsonlReader → MinhashDedupFilter →
  DocumentTokenizer (the same HF tokenizer.json). Prints one JSON line: wall seconds per stage and in all.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from datatrove.data import Document
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    extractor = Trafilatura(favour_precision=True)
    filters = [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
    ]
    paths = json.load(sys.stdin)
    extractor.extract("<html><body><p>warm-up</p></body></html>")
    for path in paths:
        with open(path, "rb") as f:
            html = f.read().decode("utf-8", errors="replace")
        started = time.perf_counter()
        text = extractor.extract(html) or ""
        ms = (time.perf_counter() - started) * 1000
        doc = Document(text=text, id=path)
        dropped = None if text else "empty"
        for flt in filters if text else []:
            verdict = flt.filter(doc)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            if not keep:
                dropped = f"{type(flt).__name__}:{reason}"
                break
        print(
            json.dumps(
                {"path": path, "extracted": text, "final": None if dropped else doc.text, "dropped": dropped, "ms": ms}
            )
        )


def seed_lid_model(model: str) -> None:
    """Put `model` where datatrove's FT176LID looks for the lid.176 file it downloads (no network here)."""
    import os
    import shutil

    from datatrove.io import cached_assets_path
    from datatrove.utils.lid import FT176LID
    from fsspec.core import strip_protocol

    folder = cached_assets_path(library_name="datatrove", namespace="lid", subfolder="ft176")
    target = os.path.join(folder, strip_protocol(FT176LID.MODEL_URL).replace("/", "_"))  # datatrove's own naming
    shutil.copyfile(model, target)
    open(target + ".completed", "a").close()


def pipeline(warc_dir: str, work: str, tokenizer_dir: str, lid_model: str) -> None:
    import os

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LanguageFilter
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    seed_lid_model(lid_model)
    config = MinhashConfig(hash_config=HashConfig(hash_fc="sha1", precision=64))
    stages = {
        "extract+filter": [
            WarcReader(warc_dir, glob_pattern="*.warc.gz"),
            Trafilatura(favour_precision=True),
            LanguageFilter(label_only=True),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            JsonlWriter(f"{work}/filtered"),
        ],
        "minhash signatures": [JsonlReader(f"{work}/filtered"), MinhashDedupSignature(f"{work}/sigs", config=config)],
        "minhash buckets": [MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)],
        "minhash cluster": [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)],
        "dedup+tokenize": [
            JsonlReader(f"{work}/filtered"),
            MinhashDedupFilter(f"{work}/remove"),
            DocumentTokenizer(
                f"{work}/tokens",
                tokenizer_name_or_path=os.path.join(tokenizer_dir, "tokenizer.json"),
                eos_token="</s>",
                shuffle_documents=False,
            ),
        ],
    }
    times = {}
    started = time.perf_counter()
    for name, steps in stages.items():
        t = time.perf_counter()
        tasks = config.num_buckets if name == "minhash buckets" else 1  # one task per bucket, run one at a time
        LocalPipelineExecutor(
            pipeline=steps, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{name}", skip_completed=False
        ).run()
        times[name] = round(time.perf_counter() - t, 2)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "stages": times}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["pipeline"]:
        pipeline(*sys.argv[2:6])
    else:
        main()
