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

from packaging.requirements import Requirement

from tests.helpers import REPO, run_cli, write_recipe


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
import datasketch, warcio.archiveiterator, sentencepiece, tokenizers, pyarrow.parquet, datasets
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


# Imported only when present, by a library that works without it: pyarrow.lib tries cloudpickle for pickling.
OPTIONAL = {"cloudpickle"}


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


def test_the_slurm_template_ships_in_the_wheel(tmp_path):
    """llmforge/slurm.py reads its batch-script template as package data: a wheel (not only a checkout) holds it."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("llmforge-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "llmforge/templates/pretrain.sbatch" in z.namelist()
