"""`prepare_data` as users run it: the slurm array script, one-line errors, a val split refused, a trained tokenizer."""

from __future__ import annotations

import json
import re
import sys

from llmforge.config import load_recipe
from llmforge.data.prepare import prepare, train_tokenizer
from tests.helpers import REPO, corpus, one_file_recipe, recipe_for, run_cli, write_recipe
from tests.real_inputs import STDLIB


def test_prepare_sbatch_script_array_then_merge(tmp_path):
    """launch/slurm/prepare.sbatch as slurm runs it: two array tasks (env from slurm), then the merge job."""
    import os
    import sys

    from tests.helpers import run_cli

    corpus(tmp_path / "raw", per_file=8)
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out")
    train_tokenizer(recipe, origin)
    env = {"PYTHON": sys.executable}
    for task in ("0", "1"):
        r = run_cli(
            "bash",
            "launch/slurm/prepare.sbatch",
            origin,
            "--set",
            "data.val_fraction=0.1",
            env={
                **env,
                "SLURM_ARRAY_TASK_ID": task,
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_CPUS_PER_TASK": "1",
            },
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert not (tmp_path / "out" / "web" / "manifest.json").exists()
    parts = list((tmp_path / "out" / "web" / "parts").glob("*.json"))
    assert len(parts) == 6
    r = run_cli("bash", "launch/slurm/prepare.sbatch", origin, env={**env, "SLURM_ARRAY_TASK_ID": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "web" / "manifest.json").read_text())
    assert manifest["parts"] == 6 and manifest["stats"]["kept"] == 6 * 8 - 2
    assert os.path.isfile(tmp_path / "out" / "web" / "train-00000.bin")


def test_prepare_cli_bad_input_is_one_line(tmp_path):
    from tests.helpers import run_cli

    corpus(tmp_path / "raw", per_file=8)
    recipe, origin = recipe_for(tmp_path, tmp_path / "raw", "out")
    r = run_cli("python", "launch/prepare_data.py", "--recipe", origin)  # no tokenizer trained yet
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"recipe error: {origin}: tokenizer.path: not found: {tmp_path / 'tok.json'} "
        f"(run launch/train_tokenizer.py --recipe {origin})"
    ]
    r = run_cli(
        "python",
        "launch/train_tokenizer.py",
        "--recipe",
        origin,
        "--set",
        f"data.sources=[{{name: w, type: jsonl, paths: ['{tmp_path}/none/*.jsonl']}}]",
    )
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("data error: data.sources[w].paths:") and "matches no files" in line
    r = run_cli(
        "python",
        "launch/train_tokenizer.py",
        "--recipe",
        origin,
        "--set",
        "tokenizer.type=sentencepiece",
        "--set",
        "tokenizer.vocab_size=40",
        "--set",
        f"tokenizer.path={tmp_path}/sp.model",
    )
    assert r.returncode == 2 and "recipe error:" in r.stderr and "tokenizer.vocab_size" in r.stderr
    # the sample's progress bar and size, then the error in one line naming where the value came from
    lines = [x for x in re.split(r"[\r\n]", r.stderr) if x.strip() and not x.startswith("tokenizer sample:")]
    assert len(lines) == 2, r.stderr
    assert re.fullmatch(r"training the sentencepiece tokenizer on [\d.]+kB of cleaned text", lines[0])
    assert lines[1].startswith("recipe error: --set: tokenizer.vocab_size: "), r.stderr
    r = run_cli("python", "launch/prepare_data.py", "--recipe", origin, "--shard-index", "3", "--num-shards", "2")
    assert r.returncode == 2 and "outside 0..1" in r.stderr


def test_training_with_an_empty_val_split_and_eval_on_is_refused(tmp_path):
    recipe, origin = one_file_recipe(tmp_path, val_fraction=0.0)
    train_tokenizer(recipe, origin)
    prepare(recipe, origin, progress=False)
    r = run_cli(sys.executable, str(REPO / "launch" / "pretrain.py"), "--recipe", origin)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert "eval.interval is 6 but the val split of" in line and "data.val_fraction > 0" in line
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
    r = run_cli(
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--recipe",
        origin,
        "--set",
        "eval.interval=0",
        "--set",
        "checkpoint.interval=0",
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_prepare_uses_a_trained_sentencepiece_tokenizer_without_vocab_size(tmp_path):
    (tmp_path / "corpus").mkdir()
    for name in ("textwrap.py", "shlex.py", "argparse.py"):
        (tmp_path / "corpus" / f"{name}.txt").write_bytes((STDLIB / name).read_bytes())
    tok = {"type": "sentencepiece", "path": str(tmp_path / "sp.model")}
    train_path = write_recipe(
        tmp_path / "train.yaml", tmp_path, tmp_path / "runs", tokenizer={**tok, "vocab_size": 400}
    )
    no_vocab = write_recipe(tmp_path / "use.yaml", tmp_path, tmp_path / "runs", tokenizer=tok)
    r = run_cli(sys.executable, str(REPO / "launch" / "train_tokenizer.py"), "--recipe", str(no_vocab))
    assert r.returncode == 2 and "tokenizer.vocab_size: is required to train a sentencepiece tokenizer" in r.stderr
    train_tokenizer(load_recipe(str(train_path)), str(train_path))
    r = run_cli(sys.executable, str(REPO / "launch" / "prepare_data.py"), "--recipe", str(no_vocab))
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "prepared" / "stdlib" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 400 and manifest["splits"]["train"]["documents"] >= 2


def test_prepare_cli_a_source_that_keeps_nothing_exits_2_with_its_reasons(tmp_path):
    """The newcomer's 17 MB text file, in small: one file longer than data.max_chars and never cut (chunk_chars 0)
    keeps nothing; the summary says so and the command fails in one line instead of writing an empty dataset."""
    recipe, origin = one_file_recipe(tmp_path, chunk_chars=0, max_chars=500_000)
    train_tokenizer(recipe, origin)
    r = run_cli(sys.executable, "launch/prepare_data.py", "--recipe", origin)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "data error: data.sources[book] kept no documents: read 1 documents; dropped 1 too_long "
        "(data.max_chars, data.chunk_chars)"
    )
    assert "WARNING book: kept no documents" in r.stdout
