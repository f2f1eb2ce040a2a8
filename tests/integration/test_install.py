"""What a user's `pip install -e .` (no extras) gets must run the data path: every distribution the readers import
is a runtime requirement (not something the dev extras happen to pull), an extractor that cannot be imported stops
the recipe at load time with one line, and the install check prepares every source type."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO, free_port, run_cli, write_recipe
from tests.real_inputs import STDLIB


def runtime_closure(dist: str = "llmforge") -> set[str]:
    """Normalised names of the distributions `pip install <dist>` brings in (markers evaluated, no extras)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


# What preparing each source type imports (the readers, the extractors as they run, dedup, tokenizers, Parquet).
DATA_PATH = """
import sys, json
import llmforge.data.prepare, llmforge.data.sources.web as web, llmforge.data.sources.encoding as enc
page = '<html><body><article><p>' + 'A sentence about rivers and their banks. ' * 30 + '</p></article></body></html>'
assert web.html_to_text(page.encode(), 'trafilatura') and web.html_to_text(page.encode(), 'resiliparse')
enc.decode(b'caf\\xe9 cr\\xe8me br\\xfbl\\xe9e, na\\xefve fa\\xe7ade', {})
from llmforge.data.language import identify, stop_words
assert identify('Ein ganz gewöhnlicher deutscher Satz über Flüsse.')[0] == 'de' and stop_words('de')
import datasketch, warcio.archiveiterator, sentencepiece, tokenizers, pyarrow.parquet, datasets
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


# Imported only when present, by a library that works without it: pyarrow.lib tries cloudpickle for pickling,
# trafilatura py3langid for its own language filter (which llmforge does not use), requests chardet, colorlog
# colorama.
OPTIONAL = {"cloudpickle", "py3langid", "chardet", "colorama"}


def test_every_distribution_the_data_path_imports_is_a_runtime_requirement():
    out = subprocess.run([sys.executable, "-c", DATA_PATH], capture_output=True, text=True, check=True)
    modules = [m for m in json.loads(out.stdout.strip().splitlines()[-1]) if m not in OPTIONAL]
    owners = md.packages_distributions()
    closure = runtime_closure()
    missing = {}
    for module in modules:
        for dist in owners.get(module, []):
            name = re.sub(r"[-_.]+", "-", dist).lower()
            if name not in closure and name != "llmforge":
                missing[module] = dist
    assert "lxml-html-clean" in closure and "charset-normalizer" in closure
    assert not missing, f"imported by the data path but not a runtime requirement of llmforge: {missing}"


def test_an_extractor_that_cannot_be_imported_stops_the_recipe_in_one_line(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.warc.gz").write_bytes(b"")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path,
        tmp_path / "runs",
        data={
            "sources": [{"name": "web", "type": "warc", "paths": [str(tmp_path / "raw")], "extractor": "trafilatura"}],
            "prepared_dir": str(tmp_path / "out"),
        },
    )
    # The failure a user's environment had: lxml >= 5.2 without the lxml_html_clean distribution.
    blocked = (
        "import sys, runpy; sys.modules['lxml.html.clean'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    r = run_cli(sys.executable, "-c", blocked, str(REPO / "launch" / "prepare_data.py"), "--recipe", str(recipe))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.sources[0].extractor: trafilatura cannot be imported" in lines[0], lines
    assert not (tmp_path / "out").exists()
    other = tmp_path / "r2.yaml"
    other.write_text(recipe.read_text().replace("extractor: trafilatura", "extractor: resiliparse"))
    load = (
        "import sys; sys.modules['lxml.html.clean'] = None; from llmforge.config import load_recipe; "
        f"print(load_recipe({str(other)!r}).data.sources[0].extractor)"
    )
    r = run_cli(sys.executable, "-c", load)
    assert r.returncode == 0 and r.stdout.strip() == "resiliparse", r.stderr  # the other extractor still loads


def test_install_check_prepares_every_source_type():
    r = run_cli(sys.executable, str(REPO / "tests" / "install_check.py"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for kind in ("warc", "html", "code", "latex", "text", "jsonl", "parquet"):
        assert re.search(rf"^{kind}\s+[1-9]\d* documents", r.stdout, re.M), r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = out.glob("llmforge-*.whl")
    return path


def test_the_wheel_ships_the_slurm_template_recipes_and_deepspeed_configs(wheel):
    """llmforge/slurm.py reads its batch-script template as package data, and recipes extend shipped recipes: a
    wheel (not only a checkout) holds them all."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "llmforge/templates/pretrain.sbatch" in names and "llmforge/__main__.py" in names
    package = REPO / "llmforge"
    shipped = [*package.glob("recipes/**/*.yaml"), *package.glob("ds_configs/*.json")]
    assert len(shipped) >= 20 and {f"llmforge/{p.relative_to(package).as_posix()}" for p in shipped} <= names


def test_a_newcomer_from_a_wheel_outside_the_checkout(tmp_path, wheel):
    """The first day, as a user has it: the wheel in a fresh venv (its dependencies, not llmforge, reached through
    a .pth to this venv's site-packages), a project directory outside the checkout with a recipe that extends a
    shipped one and a raw corpus of one 5.6 MB text file (over data.max_chars' default), every command run from
    another directory: tokenizer, prepare, 2-rank training, a resume on 1 rank that keeps the global batch, export."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = str(venv / "bin" / "python")

    def purelib(exe: str) -> str:
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        return subprocess.run([exe, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    Path(purelib(py), "deps.pth").write_text(purelib(sys.executable) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "raw").mkdir(parents=True)
    elsewhere.mkdir()
    with open(proj / "raw" / "big.txt", "wb") as f:  # real text: standard-library sources, one file
        for source in sorted(STDLIB.rglob("*.py")):
            f.write(source.read_bytes())
            if f.tell() > 5_600_000:
                break
    (proj / "my.yaml").write_text(
        "extends: llmforge:tiny-char.yaml\n"
        "run: {name: first, output_dir: runs}\n"
        "data: {sources: [{name: big, type: text, paths: [raw/big.txt]}], prepared_dir: data, seq_len: 64}\n"
        "tokenizer: {path: data/tokenizer.json}\n"
        "model: {d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2}\n"
        "train: {max_steps: 4, micro_batch_size: 4, warmup_steps: 2, precision: fp32}\n"
        "checkpoint: {interval: 4}\neval: {interval: 4, batches: 2}\nlogging: {interval: 1, tensorboard: false}\n"
    )
    recipe = "../proj/my.yaml"

    def run(*args: str) -> subprocess.CompletedProcess:
        r = run_cli(py, "-m", "llmforge", *args, cwd=elsewhere, timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r

    assert run_cli(py, "-c", "import llmforge; print(llmforge.__file__)", cwd=elsewhere).stdout.startswith(str(venv))
    assert re.search(
        r"training the char tokenizer on 5\.\d+MB of cleaned text", run("train-tokenizer", "--recipe", recipe).stderr
    )
    prepared = run("prepare", "--recipe", recipe)
    summary = prepared.stdout
    # progress while the one large unit runs (the bar used to count whole units: 0/1 until the end)
    updates = [line for line in re.split(r"[\r\n]", prepared.stderr) if "prepare 1 units" in line]
    assert len(set(updates)) >= 2 and "1 docs" in updates[-1], prepared.stderr
    assert re.search(r"100%.*\| (5\.\d+M)/\1 ", updates[-1]), updates[-1]  # bytes, not units: 5.6 MB of 5.6
    manifest = json.loads((proj / "data" / "big" / "manifest.json").read_text())
    assert manifest["stats"]["read"] == 1 and manifest["stats"]["kept"] > 50, summary  # cut first, none too long
    assert "WARNING" not in summary and manifest["splits"]["val"]["documents"] >= 1
    launch = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    r = run_cli(*launch, "--module", "llmforge", "pretrain", "--recipe", recipe, cwd=elsewhere, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run("pretrain", "--recipe", recipe, "--set", "train.max_steps=6")  # 1 rank: accumulation 2 keeps 8 per step
    rows = [json.loads(x) for x in (proj / "runs" / "first" / "metrics.jsonl").read_text().splitlines()]
    (resumed,) = [x for x in rows if x.get("event") == "resumed"]
    assert resumed["changed"] == {"world_size": [2, 1], "grad_accum_steps": [1, 2], "max_steps": [4, 6]}
    steps = [x for x in rows if "loss" in x and "event" not in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[5]["tokens"] - steps[4]["tokens"] == steps[1]["tokens"] - steps[0]["tokens"] == 8 * 64
    run("export-hf", "--checkpoint", "../proj/runs/first", "--out", "hf")
    assert json.loads((elsewhere / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
