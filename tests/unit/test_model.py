import copy
import math

import pytest
import torch

from llmforge.config.recipe import ActivationCheckpointingConfig, ModelConfig
from llmforge.model import GPT, KVCache, apply_activation_checkpointing, generate
from llmforge.model.gpt import apply_rope, reference_attention, rope_tables
from tests.helpers import saved_bytes, tiny

VARIANTS = [
    dict(),
    dict(position="learned", norm="layernorm", mlp="gelu", n_kv_heads=6),
    dict(tie_embeddings=False, n_kv_heads=1),
    dict(attn_impl="reference"),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_causality(kw):
    model = tiny(**kw).eval()
    x = torch.randint(0, 61, (2, 32))
    base, _ = model(x)
    t = 17
    y = x.clone()
    y[:, t] = (y[:, t] + 5) % 61
    changed, _ = model(y)
    assert torch.equal(base[:, :t], changed[:, :t])
    assert not torch.allclose(base[:, t:], changed[:, t:])


@pytest.mark.parametrize("kv", [6, 3, 1])
def test_sdpa_equals_reference_path(kv):
    sdpa = tiny(n_kv_heads=kv).eval()
    ref = copy.deepcopy(sdpa)
    for block in ref.blocks:
        block.attn.core.impl = "reference"
    x = torch.randint(0, 61, (3, 40))
    a, la = sdpa(x, x)
    b, lb = ref(x, x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(la, lb)


def test_reference_attention_is_plain_softmax_attention():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = reference_attention(q, k, v)
    # row 0 can only see key 0, so its output is v[0]
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    w = torch.softmax(q[0, 0, 2] @ k[0, 0, :3].T / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out[0, 0, 2], w @ v[0, 0, :3])


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(2)
    d = 16
    q, k = torch.randn(d), torch.randn(d)
    cos, sin = rope_tables(64, d, 10000.0)

    def rot(x, pos):
        return apply_rope(x.view(1, 1, 1, d), cos[pos : pos + 1], sin[pos : pos + 1]).view(d)

    dots = [float(rot(q, m) @ rot(k, m - 3)) for m in (3, 10, 40, 63)]
    assert max(dots) - min(dots) < 1e-4
    assert abs(float(rot(q, 10) @ rot(k, 7)) - float(rot(q, 10) @ rot(k, 2))) > 1e-3
    torch.testing.assert_close(rot(q, 0), q)  # position 0 is the identity
    torch.testing.assert_close(rot(q, 37).norm(), q.norm())  # a rotation keeps the norm


def test_rope_equals_hf_llamas_rotate_half_form_in_fp32():
    """apply_rope is HF Llama's x·cos + rotate_half(x)·sin computed in fp32 (HF computes it in the input dtype),
    bit for bit, forward and backward (the gradient is rounded to bf16 once, not per branch)."""
    from transformers.models.llama.modeling_llama import rotate_half

    torch.manual_seed(3)
    B, H, T, d, start = 2, 3, 40, 32, 5
    cos, sin = rope_tables(T, d, 10000.0, start=start)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(start, start + T, dtype=torch.float32), inv_freq)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    full_cos, full_sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    x = torch.randn(B, H, T, d, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(B, H, T, d, dtype=torch.bfloat16)
    ours = apply_rope(x, cos, sin)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    x32 = x.float()
    ref = (x32 * full_cos + rotate_half(x32) * full_sin).to(x.dtype)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)
    assert not torch.equal(ours, x)


def test_gqa_shapes():
    model = tiny(n_heads=6, n_kv_heads=2)
    attn = model.blocks[0].attn
    assert attn.wq.weight.shape == (48, 48)
    assert attn.wk.weight.shape == (2 * 8, 48) and attn.wv.weight.shape == (2 * 8, 48)
    logits, _ = model(torch.randint(0, 61, (2, 10)))
    assert logits.shape == (2, 10, 61)
    cache = KVCache(3)
    model(torch.randint(0, 61, (2, 7)), cache=cache)
    assert cache.keys[0].shape == (2, 2, 7, 8)  # cache holds kv heads, not query heads


def test_init_std_per_layer_type():
    model = tiny(
        n_layers=8, d_model=256, n_heads=8, n_kv_heads=8, vocab_size=4000, max_seq_len=64, tie_embeddings=False
    )
    residual = 0.02 / math.sqrt(2 * 8)
    b = model.blocks[3]
    for w, std in [
        (model.tok_emb.weight, 0.02),
        (model.lm_head.weight, 0.02),
        (b.attn.wq.weight, 0.02),
        (b.attn.wk.weight, 0.02),
        (b.mlp.gate.weight, 0.02),
        (b.mlp.up.weight, 0.02),
        (b.attn.wo.weight, residual),
        (b.mlp.down.weight, residual),
    ]:
        assert abs(w.std().item() - std) / std < 0.05, (w.shape, w.std().item(), std)
        assert abs(w.mean().item()) < std * 0.05
    assert torch.equal(b.attn_norm.weight, torch.ones(256))


def test_tied_embeddings_share_storage():
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    assert tiny(tie_embeddings=False).lm_head.weight is not tiny(tie_embeddings=False).tok_emb.weight


@pytest.mark.parametrize("mode,every", [("full", 1), ("every_k", 2), ("selective", 1)])
def test_activation_checkpointing_matches_none(mode, every):
    base = tiny(dropout=0.0)
    wrapped = apply_activation_checkpointing(copy.deepcopy(base), ActivationCheckpointingConfig(mode, every))
    assert list(wrapped.state_dict()) == list(base.state_dict())  # checkpoints do not depend on the mode
    x = torch.randint(0, 61, (2, 32))
    _, l1 = base(x, x)
    _, l2 = wrapped(x, x)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    g1 = dict(base.named_parameters())
    for name, p in wrapped.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, g1[clean].grad, rtol=0, atol=0)
    n_wrapped = sum("CheckpointWrapper" in type(m).__name__ for m in wrapped.modules())
    assert n_wrapped == {"full": 3, "every_k": 2, "selective": 3}[mode]


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_loss_equals_whole_and_never_holds_the_logits(z_loss):
    model = tiny(vocab_size=997, n_layers=2)
    x = torch.randint(0, 997, (3, 40))
    y = torch.randint(0, 997, (3, 40))
    y[0, :7] = -100  # ignored targets count in neither the sum nor the mean
    grads = {}
    for chunk in (0, 50):  # 50 does not divide 120 tokens: the last chunk is short
        model.zero_grad()
        out = {}
        total, largest = saved_bytes(
            lambda out=out, chunk=chunk: out.update(
                zip(("logits", "loss"), model(x, y, loss_chunk=chunk, z_loss=z_loss))
            )
        )
        out["loss"].backward()
        grads[chunk] = (out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, total, largest)
        assert (out["logits"] is None) == bool(chunk)
    whole, chunked = grads[0], grads[50]
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    for name, g in whole[1].items():
        torch.testing.assert_close(chunked[1][name], g, rtol=1e-5, atol=1e-7)
    logits_bytes = 3 * 40 * 997 * 4
    assert whole[3] >= logits_bytes  # the whole path keeps (tokens x vocab) fp32 for backward
    assert chunked[3] < logits_bytes / 2 and chunked[2] < whole[2] - logits_bytes
    with torch.no_grad():  # eval: the same loss without checkpointing
        torch.testing.assert_close(model(x, y, loss_chunk=50, z_loss=z_loss)[1], whole[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=10, top_p=0.9)])
@pytest.mark.parametrize("kw", VARIANTS[:2])
def test_generation_with_kv_cache_equals_without(sampling, kw):
    model = tiny(**kw)
    prompt = torch.randint(0, 61, (2, 5))
    out = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(3)
        out.append(generate(model, prompt, 60, use_cache=use_cache, generator=gen, **sampling))
    assert out[0].shape == (2, 65)  # runs past max_seq_len=48: the window slides
    assert torch.equal(out[0], out[1])


def test_cache_forward_matches_full_forward():
    model = tiny().eval()
    x = torch.randint(0, 61, (1, 30))
    full, _ = model(x)
    cache = KVCache(3)
    a, _ = model(x[:, :20], cache=cache)
    b, _ = model(x[:, 20:], cache=cache)  # several new tokens with a cache: offset causal mask
    torch.testing.assert_close(torch.cat((a, b), dim=1), full, atol=1e-5, rtol=1e-4)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_counts_every_matmul_weight(tie):
    """The MFU numerator against torch's FLOP counter on the reference attention path (plain matmuls): 6 x every
    weight that multiplies per token (the LM head included, tied or not) plus PaLM's attention term 12·L·d·T."""
    from torch.utils.flop_counter import FlopCounterMode

    from llmforge.model.flops import flops_per_token

    cfg = ModelConfig(
        vocab_size=300,
        max_seq_len=64,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=160,
        tie_embeddings=tie,
        attn_impl="reference",
    )
    model, tokens = GPT(cfg), 3 * 64
    x = torch.randint(0, 300, (3, 64))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    fpt = flops_per_token(model.num_params(non_embedding=True), cfg, 64)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)  # in N, but no matmul
    assert counter.get_total_flops() / tokens == fpt - 6 * norms
