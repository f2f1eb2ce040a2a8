"""Mixture-of-experts blocks against definitions written out here: a per-token loop over each token's chosen experts,
the load-balancing loss computed by hand on a planted routing and by transformers' Mixtral function, the z-loss,
and the capacity limit's drops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.config.recipe import ModelConfig, MoEConfig
from llmforge.config.recipe_base import ConfigError
from llmforge.model.flops import inactive_params
from llmforge.model.gpt import GPT, MoE


def moe_config(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=61, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, moe=MoEConfig(**moe))


def per_token(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token's output written from the definition: softmax over the router's logits, the top_k experts,
    weights renormalised to 1, the weighted sum of those experts' SwiGLU outputs (plus shared experts)."""
    w = layer.experts
    x = x.detach()
    out = []
    for h in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(h @ layer.gate.weight.detach().T, dim=-1)
        top = sorted(range(layer.num_experts), key=lambda e: -float(probs[e]))[: layer.top_k]
        total = sum(float(probs[e]) for e in top)
        y = torch.zeros_like(h)
        for e in top:
            y = y + float(probs[e]) / total * ((F.silu(w.w1[e] @ h) * (w.w3[e] @ h)) @ w.w2[e].T)
        if layer.shared is not None:
            y = y + layer.shared(h)
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize(
    "moe", [dict(num_experts=4, top_k=2), dict(num_experts=6, top_k=1), dict(num_experts=4, top_k=3, shared_experts=1)]
)
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_routing_equals_the_per_token_definition(moe, impl):
    torch.manual_seed(0)
    layer = GPT(moe_config(impl=impl, **moe)).blocks[0].moe
    x = torch.randn(3, 10, 32)
    y, router = layer(x)
    assert (y - per_token(layer, x)).abs().max() < 1e-6
    assert int(router.load.sum()) == 30 * moe["top_k"] and int(router.dropped) == 0


def test_grouped_gemm_and_the_loop_give_the_same_outputs_and_gradients():
    torch.manual_seed(1)
    grouped = GPT(moe_config(num_experts=4, top_k=2))
    loop = copy.deepcopy(grouped)
    for module in loop.modules():
        if isinstance(module, MoE):
            module.experts.impl = "loop"
    x = torch.randint(0, 61, (2, 24))
    for model in (grouped, loop):
        router: list = []
        _, loss = model(x, x, router=router)
        (loss + sum(r.loss for r in router)).backward()
    for (name, a), b in zip(grouped.named_parameters(), loop.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def planted(logits: list[list[float]], top_k: int, capacity_factor=None) -> MoE:
    """An MoE layer whose router logits for input row i are exactly logits[i] (gate = identity on the first
    num_experts dimensions)."""
    E = len(logits[0])
    layer = GPT(moe_config(num_experts=E, top_k=top_k, capacity_factor=capacity_factor)).blocks[0].moe
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[:, :E] = torch.eye(E)
    return layer


def test_balance_and_z_loss_on_a_planted_routing():
    rows = [[2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 2.0]]
    layer = planted(rows, top_k=1)
    x = torch.zeros(1, 4, 32)
    x[0, :, :4] = torch.tensor(rows)
    _, router = layer(x)
    assert router.load.tolist() == [2, 1, 0, 1]
    # softmax of a row with one 2 and three 0s: e²/(e²+3) on the 2, 1/(e²+3) elsewhere
    hi, lo = math.exp(2) / (math.exp(2) + 3), 1 / (math.exp(2) + 3)
    mean_prob = [(2 * hi + 2 * lo) / 4, (hi + 3 * lo) / 4, (4 * lo) / 4, (hi + 3 * lo) / 4]
    fraction = [2 / 4, 1 / 4, 0, 1 / 4]
    balance = 4 * sum(f * p for f, p in zip(fraction, mean_prob))
    assert abs(float(router.balance) - balance) < 1e-6
    assert abs(float(router.z) - math.log(math.exp(2) + 3) ** 2) < 1e-5
    w = layer.aux_weight, layer.z_weight
    assert abs(float(router.loss) - (w[0] * balance + w[1] * math.log(math.exp(2) + 3) ** 2)) < 1e-6


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_equals_transformers_mixtral(top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(top_k)
    layer = GPT(moe_config(num_experts=8, top_k=top_k)).blocks[0].moe
    x = torch.randn(4, 16, 32)
    _, router = layer(x)
    logits = layer.gate(x.reshape(-1, 32))
    want = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    assert abs(float(router.balance) - float(want)) < 1e-6


def test_capacity_drops_later_assignments_first_choices_first():
    # 4 tokens, 2 experts, top_k 1, capacity ceil(1.0 * 4 * 1 / 2) = 2: expert 0 is every token's first choice
    # but takes only tokens 0 and 1; tokens 2 and 3 are dropped and their output is zero.
    rows = [[3.0, 0], [2.0, 0], [1.0, 0], [4.0, 0]]
    layer = planted(rows, top_k=1, capacity_factor=1.0)
    x = torch.zeros(1, 4, 32)
    x[0, :, :2] = torch.tensor(rows)
    y, router = layer(x)
    assert int(router.dropped) == 2 and router.load.tolist() == [4, 0]
    full = per_token(layer, x)
    assert torch.allclose(y[0, :2], full[0, :2], atol=1e-6) and torch.equal(y[0, 2:], torch.zeros(2, 32))
    # top_k 2 with capacity 2 per expert: first choices fill expert 0 (tokens 0, 1) before any second choice
    layer = planted(rows, top_k=2, capacity_factor=0.5)  # ceil(0.5 * 4 * 2 / 2) = 2
    y, router = layer(x)
    assert int(router.dropped) == 4 and router.load.tolist() == [4, 4]


def test_aux_losses_train_the_router_and_reach_the_objective_only_through_the_list():
    torch.manual_seed(2)
    model = GPT(moe_config(num_experts=4, top_k=2))
    x = torch.randint(0, 61, (2, 16))
    _, plain = model(x, x)
    router: list = []
    _, loss = model(x, x, router=router)
    assert torch.equal(plain, loss) and len(router) == 2  # both blocks are MoE blocks (every: 1)
    sum(r.loss for r in router).backward()
    gate = model.blocks[0].moe.gate.weight.grad
    assert gate is not None and gate.abs().sum() > 0
    # the aux losses reach the last block's router, not its experts, nor the final norm
    assert model.blocks[1].moe.experts.w1.grad is None and model.norm.weight.grad is None


def test_layers_parameters_and_config_errors():
    cfg = moe_config(num_experts=4, top_k=2, every=2, shared_experts=1)
    model = GPT(cfg)
    assert cfg.moe_layers == [0] and model.blocks[1].moe is None and model.blocks[1].mlp is not None
    expert = 3 * 32 * 48
    assert model.num_params(active=True) == model.num_params() - 2 * expert == model.num_params() - inactive_params(cfg)
    assert moe_config(num_experts=4, layers=[1]).moe_layers == [1]
    for kw, key in [
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=4, layers=[5]), "moe.layers"),
        (dict(num_experts=4, d_ff=20), "moe.impl"),
    ]:
        with pytest.raises(ConfigError) as e:
            moe_config(**kw)
        assert e.value.key == key


def test_plan_counts_active_parameters_and_splits_experts_over_the_expert_layout():
    import dataclasses

    from llmforge.config import load_recipe
    from llmforge.plan import count_params, format_plan, params_per_rank, plan, planned_model, split_params

    recipe = load_recipe("recipes/moe-tiny.yaml")
    cfg = planned_model(recipe, 256)
    dense, experts = split_params(cfg)
    assert experts == 4 * 8 * 3 * 128 * 192 and dense + experts == count_params(cfg)[0]
    assert params_per_rank(cfg, 1, 2) == dense + experts // 2

    def rows(expert: int) -> dict:
        r = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, expert=expert))
        return {(x.stage, x.checkpointing): x for x in plan(r, "recipes/moe-tiny.yaml", 4, 80, vocab_size=256)}

    ep1, ep2 = rows(1), rows(2)
    # ZeRO-1 keeps whole weights: an expert-parallel rank holds half the experts; the optimizer state is the same
    # per rank (dense state over 4 ranks, each expert's over the 2 that hold it)
    assert ep2[1, "none"].params_gb == pytest.approx(
        ep1[1, "none"].params_gb * (dense + experts / 2) / (dense + experts)
    )
    assert ep2[1, "none"].optimizer_gb == pytest.approx(ep1[1, "none"].optimizer_gb)
    assert ep1[1, "none"].comm_gb["expert"] == 0 < ep2[1, "none"].comm_gb["expert"] < ep2[1, "full"].comm_gb["expert"]
    # time counts active parameters: the same as the dense demo model's MLP width (2 experts of 192 = 384)
    dense_rows = plan(load_recipe("recipes/tiny-char.yaml"), "recipes/tiny-char.yaml", 4, 80, vocab_size=256)
    assert ep1[1, "none"].tokens_per_s == pytest.approx(dense_rows[0].tokens_per_s, rel=0.01)
    total = count_params(cfg)[0]
    head = format_plan(list(ep2.values()), total, 4, 80, active=total - 3 * experts // 4).splitlines()[0]
    assert f"{total / 1e6:.1f}M parameters ({(total - 3 * experts // 4) / 1e6:.1f}M active per token" in head


@pytest.mark.parametrize(
    "sets, problem",
    [
        (["model.moe.num_experts=0"], "needs mixture-of-experts blocks"),
        (["parallel.expert=4", "model.moe.num_experts=6"], "4 does not divide model.moe.num_experts=6"),
        (["parallel.expert=8", "model.moe.num_experts=8"], "8 does not divide the 4 data-parallel replicas"),
        (["model.moe.capacity_factor=1.25"], "routes dropless"),
        (["model.moe.shared_experts=1"], "shared experts"),
        (["deepspeed.config=llmforge:zero0.json", "train.precision=fp32"], "ZeRO stages 1-3"),
        (["parallel.tensor=2"], "expert with tensor parallelism is not yet checked"),
        (["parallel.expert=1", "parallel.sequence=2"], "sequence parallelism is not yet checked"),
        (["posttrain.lora.rank=4"], "LoRA freezes the experts"),
    ],
)
def test_expert_layouts_refused_in_one_line(sets, problem):
    from llmforge.config import load_recipe
    from llmforge.config.deepspeed import compose_ds_config, zero_stage
    from llmforge.config.parallel import check_layout
    from llmforge.errors import RecipeError

    recipe = load_recipe("recipes/moe-tiny.yaml", ["parallel.expert=2", *sets])
    stage = zero_stage(compose_ds_config(recipe, 4, recipe.run_dir, "r.yaml", on_cpu=True))
    with pytest.raises(RecipeError) as e:
        check_layout(recipe, 4, stage, "r.yaml")
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_lora_on_an_moe_model_adapts_attention_and_dense_mlps_and_merges_back():
    """LoRA on a model with one MoE block of two: adapters on the attention of both blocks and the dense block's MLP,
    the router and stacked experts frozen (no gradient), and the merged model computes what the adapted one does
    (the MoE block has no dense MLP to merge into)."""
    from llmforge.config.recipe import LoraConfig
    from llmforge.model.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = GPT(moe_config(num_experts=4, layers=[1]))
    trainable = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["wq", "wv", "up", "down"]))
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert {n.rsplit(".", 1)[0] for n in names} == {
        "blocks.0.attn.wq", "blocks.0.attn.wv", "blocks.0.mlp.up", "blocks.0.mlp.down",
        "blocks.1.attn.wq", "blocks.1.attn.wv",
    }  # fmt: skip
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.1)  # adapters that change the output
    x = torch.randint(0, 61, (2, 16))
    router: list = []
    _, loss = model(x, x, router=router)
    (loss + sum(r.loss for r in router)).backward()
    frozen = [p for n, p in model.named_parameters() if ".moe." in n]
    assert frozen and all(p.grad is None for p in frozen)
    with torch.no_grad():
        adapted = model(x)[0]
        merged = merge_lora(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x)[0], adapted, rtol=1e-5, atol=1e-5)
