"""Document-masked attention (model.attention_mask: document): a packed window computes what its documents computed
one by one, positions included."""

from __future__ import annotations

import pytest
import torch

from llmforge.model import KVCache, gpt
from llmforge.model.gpt import document_attention, document_ids, document_positions, reference_attention
from tests.helpers import tiny

EOS = 0


def test_document_ids_and_positions_by_hand():
    idx = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 3, 4, 5, 6, 7, 8, 9]])
    assert document_ids(idx, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(document_ids(idx, EOS)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def packed(lengths: list[int], rows: int = 2) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """(rows, sum(lengths)) windows of documents that end with EOS (the last one cut by the window, as packing
    does), and each row's documents."""
    g = torch.Generator().manual_seed(1)
    windows, docs = [], []
    for r in range(rows):
        parts = []
        for i, n in enumerate(lengths if r == 0 else lengths[::-1]):
            body = torch.randint(1, 61, (n,), generator=g)
            if i < len(lengths) - 1:
                body[-1] = EOS
            parts.append(body)
        windows.append(torch.cat(parts))
        docs.append(parts)
    return torch.stack(windows), docs


@pytest.mark.parametrize(
    "kw", [dict(), dict(position="learned"), dict(attn_impl="reference"), dict(n_kv_heads=1), dict(n_kv_heads=6)]
)
def test_a_packed_window_equals_its_documents_run_one_by_one(kw):
    model = tiny(**kw).eval()
    idx, docs = packed([9, 1, 17, 13])
    with torch.no_grad():
        logits, _ = model(idx, documents=document_ids(idx, EOS))
        causal, _ = model(idx)
    for r, parts in enumerate(docs):
        start = 0
        for part in parts:
            with torch.no_grad():
                alone, _ = model(part[None])
            got = logits[r, start : start + len(part)]
            assert torch.allclose(got, alone[0], atol=1e-5, rtol=1e-5), (kw, r, start, (got - alone[0]).abs().max())
            start += len(part)
    # without the mask, the second document's tokens see the first: different logits
    n = len(docs[0][0])
    assert not torch.allclose(causal[0, n:], logits[0, n:], atol=1e-3)
    assert torch.allclose(causal[0, :n], logits[0, :n], atol=1e-5)


def test_gradients_of_a_packed_window_equal_the_sum_over_its_documents():
    model = tiny()
    idx, docs = packed([11, 20, 9], rows=1)
    targets = torch.roll(idx, -1, dims=1)
    model.zero_grad()
    _, loss = model(idx, targets, documents=document_ids(idx, EOS))
    (loss * idx.numel()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    start = 0
    for part in docs[0]:
        t = targets[:, start : start + len(part)]
        _, loss = model(part[None], t)
        (loss * len(part)).backward()
        start += len(part)
    for n, p in model.named_parameters():
        assert torch.allclose(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_the_cpu_kernel_equals_the_masked_reference():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 64, 16, generator=g)
    k, v = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 4, 64, 16, generator=g)
    documents = torch.tensor([[0] * 10 + [1] * 30 + [2] * 24, [0] * 63 + [1]])
    got = document_attention(q, k, v, documents)
    want = reference_attention(q, k, v, 0, 0.0, documents)
    assert torch.allclose(got, want, atol=1e-5)


def test_generation_and_a_cache_are_refused_with_documents():
    model = tiny().eval()
    idx, _ = packed([8, 8], rows=1)
    with pytest.raises(ValueError, match="KV cache"):
        model(idx, cache=KVCache(3), documents=document_ids(idx, EOS))


def test_the_flex_attention_path_equals_the_cpu_path_in_forward():
    """CUDA's kernel (flex_attention with the same-document block mask) run eagerly on CPU, where its forward exists:
    the per-document path's output, documents of 1 to 100 tokens, grouped-query heads; the block mask is built once
    per documents tensor."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 8, 128, 16, generator=g)
    k, v = torch.randn(2, 2, 128, 16, generator=g), torch.randn(2, 2, 128, 16, generator=g)
    cuts = torch.zeros(2, 128, dtype=torch.long)
    cuts[0, [1, 2, 40, 41, 100]] = 1
    cuts[1, [64]] = 1
    documents = cuts.cumsum(1)
    flex = gpt.flex_document_attention(q, k, v, documents, compiled=False)
    assert (flex - document_attention(q, k, v, documents)).abs().max() < 1e-5
    assert (flex - reference_attention(q, k, v, documents=documents)).abs().max() < 1e-5
    mask = gpt._block_masks[0][1]
    gpt.flex_document_attention(q, k, v, documents, compiled=False)
    assert gpt._block_masks[0][1] is mask  # every layer of a forward: one mask
    other = torch.zeros_like(documents)
    alone = gpt.flex_document_attention(q, k, v, other, compiled=False)  # one document: plain causal attention
    assert gpt._block_masks[0][1] is not mask
    assert (alone - reference_attention(q, k, v)).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: flex_attention's path runs on CUDA")
def test_the_gpu_path_equals_the_cpu_path():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 256, 64, generator=g)
    k, v = torch.randn(2, 4, 256, 64, generator=g), torch.randn(2, 4, 256, 64, generator=g)
    documents = (torch.arange(256) // 40).expand(2, 256).contiguous()
    cpu_in = [t.clone().requires_grad_() for t in (q, k, v)]
    gpu_in = [t.cuda().requires_grad_() for t in (q, k, v)]
    cpu = document_attention(*cpu_in, documents)
    gpu = document_attention(*gpu_in, documents.cuda())
    assert torch.allclose(gpu.detach().cpu(), cpu.detach(), atol=1e-3)
    w = torch.randn(cpu.shape, generator=g)
    (cpu * w).sum().backward()
    (gpu * w.cuda()).sum().backward()
    for a, b in zip(cpu_in, gpu_in):
        assert torch.allclose(b.grad.cpu(), a.grad, atol=1e-3)
