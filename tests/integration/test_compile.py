"""torch.compile of the blocks and the loss (train.compile): the same numbers as eager, one shared graph, and the
planner's activation bytes for compiled models. Inductor builds its kernels with a C++ compiler in a subprocess, so
these live here, not in tests/unit."""

import copy

import pytest
import torch

from llmforge.config.recipe import ActivationCheckpointingConfig, ModelConfig
from llmforge.model import apply_activation_checkpointing, compile_model
from llmforge.plan import activation_bytes
from tests.helpers import SHAPES, kept_for_backward, saved_bytes, tiny


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_blocks_match_eager_and_share_one_graph(mode):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = apply_activation_checkpointing(tiny(n_layers=4), ActivationCheckpointingConfig(mode))
    compiled = compile_model(copy.deepcopy(base))
    assert list(compiled.state_dict()) == list(base.state_dict())  # checkpoints do not depend on compilation
    x = torch.randint(0, 61, (2, 32))
    _, l1 = base(x, x)
    _, l2 = compiled(x, x)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    g1 = dict(base.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, g1[name].grad, rtol=1e-4, atol=1e-6)
    # the blocks and the loss ran compiled code: four blocks needed one graph (parameters are inputs, not
    # constants), the loss one more
    assert counters["stats"]["calls_captured"] > 0
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("with_z", [False, True])
def test_compiled_loss_matches_eager_and_keeps_no_fp32_logits(with_z):
    """train.compile's loss: the same sums and logit gradients as eager, but backward keeps the bf16 logits and one
    fp32 log-sum-exp per token instead of the fp32 log-softmax (what the planner counts for each)."""
    from llmforge.model.gpt import TokenLoss

    torch._dynamo.reset()
    n, vocab = 96, 1000
    torch.manual_seed(0)
    logits = (torch.randn(n, vocab) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,))
    targets[:9] = -100
    results = {}
    compiled_loss = TokenLoss()
    compiled_loss.compile()
    for name, loss in (("eager", TokenLoss()), ("compiled", compiled_loss)):
        x = logits.clone().requires_grad_()
        out = {}
        kept, _ = saved_bytes(lambda out=out, loss=loss, x=x: out.update(sums=loss(x, targets, with_z)))
        ce, z = out["sums"]
        (ce + 0.1 * z).backward()
        results[name] = (ce.detach(), z.detach(), x.grad, kept)
    eager, compiled = results["eager"], results["compiled"]
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-3)
    assert compiled[1].item() > 0 if with_z else compiled[1].item() == 0
    torch.testing.assert_close(compiled[2].float(), eager[2].float(), rtol=2e-2, atol=1e-4)
    assert eager[3] >= n * vocab * 4  # the fp32 log-softmax
    assert n * vocab * 2 <= compiled[3] <= n * vocab * 2 + n * 8 + 4096  # bf16 logits + fp32 lse (+ targets)


# each checkpointing mode once, the two model shapes taking turns (every mode x shape pair costs a compile; the
# eager planner test in tests/unit/test_plan.py runs the full cross)
@pytest.mark.parametrize(
    "shape,mode,every,loss_chunk",
    [(SHAPES[0], "none", 1, 0), (SHAPES[1], "selective", 1, 0), (SHAPES[0], "full", 1, 64), (SHAPES[1], "full", 1, 64)],
    ids=[
        "rmsnorm-swiglu-gqa-none",
        "layernorm-gelu-mha-selective",
        "rmsnorm-swiglu-gqa-full",
        "layernorm-gelu-mha-full",
    ],
)
def test_activation_bytes_of_compiled_models_match_what_backward_keeps(shape, mode, every, loss_chunk):
    seq, batch = 64, 3
    cfg = ModelConfig(max_seq_len=seq, **shape)
    measured = kept_for_backward(cfg, seq, batch, mode, every, loss_chunk, compiled=True)
    predicted = activation_bytes(
        cfg, seq, batch, mode, every, fused_norm=False, loss_chunk=loss_chunk, compiled=True, transients=False
    )
    assert abs(predicted - measured) <= 0.1 * measured, (measured, predicted)
