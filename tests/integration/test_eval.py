"""Evaluation: perplexity JSON from a checkpoint, and lm-evaluation-harness running a local multiple-choice task on an
llmforge checkpoint through the adapter (whose log-likelihoods equal the model's own)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, rows, run_cli, write_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> Path:
    tmp = tmp_path_factory.mktemp("evalrun")
    recipe = write_recipe(
        tmp / "r.yaml",
        prepared,
        tmp / "runs",
        run={"name": "ev"},
        train={"max_steps": 30, "warmup_steps": 3},
        eval={"interval": 30, "batches": 200},
        checkpoint={"interval": 30},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "runs" / "ev"


def test_evaluate_writes_perplexity_json(trained, prepared):
    r = run_cli(sys.executable, "launch/evaluate.py", "--checkpoint", str(trained))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((trained / "eval" / "perplexity_step_00000030.json").read_text())
    res = report["datasets"]["stdlib"]
    assert report["step"] == 30 and res["tokens"] == res["samples"] * 64
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    # fp32 over every val window vs the in-loop bf16 estimate over the same windows (eval.batches covers them all)
    in_loop = rows(trained)
    last_val = [x["val_loss"] for x in in_loop if "val_loss" in x][-1]
    assert abs(res["loss"] - last_val) < 0.05, (res["loss"], last_val)
    assert f"stdlib: val loss {res['loss']:.4f}" in r.stdout
    r = run_cli(
        sys.executable,
        "launch/evaluate.py",
        "--checkpoint",
        str(trained),
        "--max-samples",
        "3",
        "--out",
        str(trained / "small.json"),
    )
    assert json.loads((trained / "small.json").read_text())["datasets"]["stdlib"]["samples"] == 3
    r = run_cli(sys.executable, "launch/evaluate.py", "--checkpoint", str(trained), "--dataset", str(prepared / "nope"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("data error:")


TASK = """task: toy_syntax
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_runs_a_local_task_on_a_checkpoint(tmp_path, trained):
    pytest.importorskip("lm_eval")
    docs = [
        {"context": "import o", "choices": ["s\n", "q#"], "answer": 0},
        {"context": "def __init__(sel", "choices": ["f", "Z"], "answer": 0},
        {"context": "    return Non", "choices": ["e", "x"], "answer": 0},
        {"context": "for i in rang", "choices": ["(", "e("], "answer": 1},
    ] * 3
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy_syntax.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "lm_eval.json"
    r = run_cli(
        sys.executable,
        "-m",
        "llmforge.cli",
        "lm-eval",
        "--checkpoint",
        str(trained),
        "--tasks",
        "toy_syntax",
        "--include-path",
        str(tmp_path / "tasks"),
        "--out",
        str(out),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    acc = report["results"]["toy_syntax"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and report["n_samples"]["toy_syntax"]["effective"] == len(docs)
    assert "toy_syntax: acc" in r.stdout

    # the same task through the exported Hugging Face model and lm-eval's own `hf` model: the same accuracy
    r = run_cli(sys.executable, "launch/export_hf.py", "--checkpoint", str(trained), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    via_hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
        tasks=["toy_syntax"],
        task_manager=tasks,
        log_samples=False,
    )
    assert via_hf["results"]["toy_syntax"]["acc,none"] == acc

    # the adapter's numbers are the model's: log p(continuation | context) summed over its tokens
    from llmforge.eval.harness import LLMForgeLM

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = LLMForgeLM(str(trained))
    ctx, cont = "    return Non", "e\n"
    ((score, greedy),) = lm.loglikelihood([Req(ctx, cont)])
    ids = lm.tok.encode(ctx + cont)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
    n = len(lm.tok.encode(cont))
    want = sum(float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1 - n, len(ids) - 1))
    assert score == pytest.approx(want, abs=1e-4)
    text = "def f(x):\n    return x\n"
    (rolling,) = lm.loglikelihood_rolling([Req(text)])
    ids = [lm.tok.eos_id] + lm.tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
    assert rolling == pytest.approx(sum(float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1)), abs=1e-3)
    (gen,) = lm.generate_until([Req("def ", {"until": ["\n"], "max_gen_toks": 20})])
    assert "\n" not in gen and len(gen) <= 20
