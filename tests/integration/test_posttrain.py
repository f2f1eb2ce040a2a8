"""SFT and DPO on 2 CPU ranks from a pre-trained checkpoint: prompt tokens carry no loss, a toy format is learned,
resume is exact, the DPO loss matches a hand computation, and preference accuracy and margin rise (ZeRO-2 and 3)."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

from llmforge.demo.toy_chat import preference_records, sft_records, toy_word, write_jsonl
from tests.helpers import REPO, free_port, losses_after_last_start, rows, run_cli, write_recipe


def post_cmd(task: str, recipe: Path, *extra: str) -> list[str]:
    bindir = Path(sys.executable).parent
    return [
        str(bindir / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        f"launch/{task}.py",
        "--recipe",
        str(recipe),
        *extra,
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared) -> Path:
    """A small char model pre-trained for 60 steps on the stdlib corpus (one process, ZeRO-0)."""
    tmp = tmp_path_factory.mktemp("base")
    recipe = write_recipe(
        tmp / "r.yaml",
        prepared,
        tmp / "runs",
        run={"name": "base"},
        model={"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        data={**_data(prepared), "seq_len": 96},
        train={"max_steps": 60, "warmup_steps": 5, "micro_batch_size": 8},
        eval={"interval": 0},
        checkpoint={"interval": 60},
        deepspeed={"config": str(REPO / "ds_configs/zero0.json")},
    )
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "runs" / "base"


def _data(prepared: Path) -> dict:
    return {
        "sources": [{"name": "stdlib", "type": "text", "paths": [str(prepared / "corpus" / "*.txt")]}],
        "prepared_dir": str(prepared / "prepared"),
    }


def write_sft(path: Path, n: int, seed: int) -> Path:
    """Toy format: any request is answered 'ANSWER: <the request's last word>'."""
    return Path(write_jsonl(str(path), sft_records(n, seed)))


def post_recipe(tmp: Path, prepared: Path, base_run: Path, name: str, train_file: Path, **sections) -> Path:
    posttrain = {"train_file": str(train_file), "val_fraction": 0.1, **sections.pop("posttrain", {})}
    train = {
        "max_steps": 40,
        "warmup_steps": 4,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "micro_batch_size": 8,
        "init_from": str(base_run),
        **sections.pop("train", {}),
    }
    return write_recipe(
        tmp / f"{name}.yaml",
        prepared,
        tmp / "runs",
        run={"name": name},
        data={"seq_len": 48},
        train=train,
        posttrain=posttrain,
        eval={"interval": 10, "batches": 2},
        checkpoint={"interval": 10},
        **sections,
    )


def test_continued_pretraining_starts_from_init_weights(tmp_path, prepared, base):
    """train.init_from on a pre-training recipe: the base's architecture and weights, fresh step and optimizer."""
    recipe = write_recipe(
        tmp_path / "c.yaml",
        prepared,
        tmp_path / "runs",
        run={"name": "cont"},
        data={**_data(prepared), "seq_len": 96},
        train={"max_steps": 4, "warmup_steps": 1, "micro_batch_size": 8, "init_from": str(base)},
        eval={"interval": 0},
    )
    r = run_cli(*post_cmd("pretrain", recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    base_losses = losses_after_last_start(base)
    cont = losses_after_last_start(tmp_path / "runs" / "cont")
    assert sorted(cont) == [1, 2, 3, 4]
    assert abs(cont[1] - base_losses[60]) < 0.3 and cont[1] < base_losses[1] - 1.0, (cont, base_losses)
    bad = write_recipe(
        tmp_path / "b.yaml", prepared, tmp_path / "runs", run={"name": "bad"}, train={"init_from": str(base)}
    )  # data.seq_len 64 fits; the tokenizer is another one
    bad.write_text(bad.read_text().replace(str(prepared / "prepared" / "tokenizer.json"), str(tmp_path / "t.json")))
    from llmforge.tokenizer import save_tokenizer
    from llmforge.tokenizer.char import CharTokenizer

    save_tokenizer(CharTokenizer(list("abc")), str(tmp_path / "t.json"))
    r = run_cli(sys.executable, "launch/pretrain.py", "--recipe", str(bad))
    assert r.returncode == 2 and "train.init_from:" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


# -- SFT ------------------------------------------------------------------------------------------------------------


def test_prompt_tokens_carry_no_loss(tmp_path, base):
    """Targets are -100 exactly off the assistant turns; the loss has zero gradient through prompt positions, and
    replacing what the prompt positions would predict leaves the loss unchanged."""
    from llmforge.posttrain.data import SFTData, read_jsonl
    from llmforge.tokenizer.added import with_chat_tokens
    from llmforge.train.loading import load_pretrained

    model, tok = load_pretrained(str(base))
    tok = with_chat_tokens(tok)
    from llmforge.train.loading import resize_vocab

    model = resize_vocab(model, tok.vocab_size)
    data = SFTData(read_jsonl(str(write_sft(tmp_path / "s.jsonl", 8, 0))), tok, 48, seed=0)
    inputs, targets, lengths = data.batch(range(4))
    real = [min(len(data.examples[data.example_index(i)].ids), 49) - 1 for i in range(4)]
    assert lengths.tolist() == real and inputs.shape[1] == max(real)  # padded to the longest row only
    assert SFTData.tokens((inputs, targets, lengths)) == sum(real) < inputs.numel()  # throughput counts no padding
    assistant = tok.token_id("<|assistant|>")
    for row_in, row_tg in zip(inputs.tolist(), targets.tolist()):
        start = row_in.index(assistant)  # the target at this position is the first response token
        assert all(t == -100 for t in row_tg[:start]) and all(t != -100 for t in row_tg[start : start + 4])
        assert tok.decode([t for t in row_tg if t != -100]).startswith("ANSWER: ")
    logits, loss = model(inputs, targets)
    grads = torch.autograd.grad(loss, logits)[0]
    prompt = targets == -100
    assert grads[prompt].abs().max() == 0 and grads[~prompt].abs().max() > 0
    # the raw next-token labels of prompt positions, replaced by anything: masked away, same loss
    scrambled = torch.where(prompt, torch.randint(0, tok.vocab_size, targets.shape), targets)
    masked = torch.where(prompt, torch.full_like(targets, -100), scrambled)
    assert torch.equal(model(inputs, masked)[1], loss)


def test_sft_learns_a_toy_format_and_resumes_exactly(tmp_path, prepared, base):
    train_file = write_sft(tmp_path / "sft.jsonl", 400, 1)
    recipe = post_recipe(tmp_path, prepared, base, "sft", train_file)
    r = run_cli(*post_cmd("sft", recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "sft"
    val = [x["val_loss"] for x in rows(run) if "val_loss" in x]
    assert val[-1] < 0.5 * val[0], val
    # greedy answers to held-out prompts follow the format and stop at <|end|>
    from llmforge.model.generate import generate
    from llmforge.posttrain.data import render
    from llmforge.train.loading import load_model

    model, tok, _ = load_model(str(run))
    rng, good = random.Random(99), 0
    for _ in range(10):
        w = toy_word(rng)
        ids = render(tok, [{"role": "user", "content": f"say {w}"}], add_generation_prompt=True).ids
        out = generate(model, torch.tensor([ids]), 14, temperature=0)[0, len(ids) :].tolist()
        end = tok.token_id("<|end|>")
        text = tok.decode(out[: out.index(end)]) if end in out else None
        good += text is not None and text.startswith("ANSWER: ") and text[8:].isalpha()
    assert good >= 8, good

    # a rank killed while saving step 20: resume from step 10 redoes 11-20 with the same losses, then finishes
    first = losses_after_last_start(run)
    r = run_cli(*post_cmd("sft", recipe, "--set", "run.name=sft2"), env={"LLMFORGE_FAULTS": "die_in_save@20"})
    assert r.returncode != 0
    r = run_cli(*post_cmd("sft", recipe, "--set", "run.name=sft2", "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    run2 = tmp_path / "runs" / "sft2"
    assert [x["step"] for x in rows(run2) if x.get("event") == "resumed"] == [10]
    after = losses_after_last_start(run2)
    assert sorted(after) == list(range(11, 41)) and all(after[s] == first[s] for s in after)


def test_lora_trains_adapters_only_and_merges_for_export(tmp_path, prepared, base):
    train_file = write_sft(tmp_path / "sft.jsonl", 200, 2)
    recipe = post_recipe(
        tmp_path,
        prepared,
        base,
        "lora",
        train_file,
        posttrain={"lora": {"rank": 4, "alpha": 8, "targets": ["wq", "wv", "up", "down"]}},
        train={"max_steps": 20, "lr": 1e-2, "min_lr": 1e-3},
    )
    r = run_cli(*post_cmd("sft", recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "lora"
    val = [x["val_loss"] for x in rows(run) if "val_loss" in x]
    assert val[-1] < val[0]
    from llmforge.train.checkpoint_files import newest_complete
    from llmforge.train.loading import _state_dict, load_model

    state = _state_dict(newest_complete(str(run / "checkpoints")))
    adapters = [k for k in state if "lora_" in k]
    assert len(adapters) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    base_state = _state_dict(newest_complete(str(base / "checkpoints")))
    emb = state["tok_emb.weight"]
    assert torch.equal(emb[: base_state["tok_emb.weight"].shape[0]].float(), base_state["tok_emb.weight"].float())
    assert torch.equal(state["blocks.0.attn.wk.weight"].float(), base_state["blocks.0.attn.wk.weight"].float())
    model, tok, _ = load_model(str(run))  # adapters merged into plain weights
    assert not any("lora_" in k for k in model.state_dict())
    assert not torch.equal(
        model.state_dict()["blocks.0.attn.wq.weight"].float(), base_state["blocks.0.attn.wq.weight"].float()
    )
    r = run_cli(sys.executable, "launch/export_hf.py", "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "<|user|>say abc<|end|><|assistant|>ANSWER: abc<|end|>"
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - hf(torch.tensor([ids])).logits).abs().max() < 1e-4


def test_bad_sft_input_is_one_line(tmp_path, prepared, base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    recipe = post_recipe(tmp_path, prepared, base, "bad", bad)
    r = run_cli(sys.executable, "launch/sft.py", "--recipe", str(recipe))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"data error: {bad}:2: needs string fields 'prompt' and 'response', or 'messages'"
    )
    recipe = post_recipe(tmp_path, prepared, base, "bad2", bad, train={"init_from": str(tmp_path / "nope")})
    r = run_cli(sys.executable, "launch/sft.py", "--recipe", str(recipe))
    assert r.returncode == 2 and "train.init_from: not found" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "runs" / "bad2").exists()


# -- DPO ------------------------------------------------------------------------------------------------------------


def test_dpo_loss_matches_hand_computation():
    from llmforge.posttrain.dpo import dpo_loss, sequence_logps

    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    h = [(-1.0 + 1.5) - (-2.0 + 1.5), (-3.0 + 2.0) - (-1.0 + 2.0)]  # 1.0, -2.0
    softplus = lambda x: math.log1p(math.exp(x))
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(sum(softplus(-beta * x) for x in h) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["reward_margin"].item() == pytest.approx(beta * sum(h) / 2, abs=1e-6)
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    want = sum(0.9 * softplus(-beta * x) + 0.1 * softplus(beta * x) for x in h) / 2
    assert smooth.item() == pytest.approx(want, abs=1e-6)
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta, loss="ipo")
    assert ipo.item() == pytest.approx(sum((x - 1.0) ** 2 for x in h) / 2, abs=1e-6)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, -100, 3, -100], [-100, -100, 4, 4, 6]])
    logp = torch.log_softmax(logits, -1)
    want = [sum(logp[b, t, targets[b, t]] for t in range(5) if targets[b, t] != -100) for b in range(2)]
    assert torch.allclose(sequence_logps(logits, targets), torch.stack(want))


def write_prefs(path: Path, n: int, seed: int) -> Path:
    """Toy preference: answers in capitals are preferred to the same answer in lower case."""
    return Path(write_jsonl(str(path), preference_records(n, seed)))


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_margin_and_accuracy_rise(tmp_path, prepared, base, stage):
    prefs = write_prefs(tmp_path / "prefs.jsonl", 300, 3)
    recipe = post_recipe(
        tmp_path,
        prepared,
        base,
        f"dpo{stage}",
        prefs,
        posttrain={"dpo": {"beta": 0.1}},
        train={"max_steps": 30, "lr": 2e-3, "min_lr": 2e-4},
        deepspeed={"config": str(REPO / f"ds_configs/zero{stage}.json")},
    )
    r = run_cli(*post_cmd("dpo", recipe))
    assert r.returncode == 0, r.stderr[-3000:]
    all_rows = rows(tmp_path / "runs" / f"dpo{stage}")
    evals = [x for x in all_rows if "val_loss" in x]
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0
    assert abs(evals[0]["val_reward_margin"]) < 1e-2 and evals[-1]["val_accuracy"] >= 0.9
    assert evals[-1]["val_reward_margin"] > 1.0 and evals[-1]["val_loss"] < 0.3
    train = [x for x in all_rows if "reward_margin" in x]
    assert {"rewards_chosen", "rewards_rejected", "accuracy"} <= set(train[-1])
    assert train[-1]["reward_margin"] > train[0]["reward_margin"]
    assert (tmp_path / "runs" / f"dpo{stage}" / "dpo_reference.pt").exists()


def test_dpo_under_tensor_parallelism_equals_one_rank(tmp_path, prepared, base):
    """tp2 on 2 ranks (one data-parallel replica) against one rank, fp32, same global batch: the reference table is
    scored per replica (both tensor ranks score the same rows, as AutoTP requires) and the losses agree."""
    prefs = write_prefs(tmp_path / "prefs.jsonl", 200, 0)
    losses = {}
    for name, cmd in (("one", [sys.executable, "launch/dpo.py"]), ("tp2", post_cmd("dpo", Path("x"))[:6])):
        recipe = post_recipe(
            tmp_path, prepared, base, name, prefs, train={"max_steps": 6, "precision": "fp32"},
            deepspeed={"config": str(REPO / "ds_configs/zero1.json")},
        )  # fmt: skip
        extra = ["--set", "parallel.tensor=2"] if name == "tp2" else []
        r = run_cli(*cmd, "--recipe", str(recipe), *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        losses[name] = losses_after_last_start(tmp_path / "runs" / name)
    assert sorted(losses["tp2"]) == list(range(1, 7))
    for step, loss in losses["one"].items():
        assert abs(losses["tp2"][step] - loss) <= 1e-5 * abs(loss), (step, losses)
