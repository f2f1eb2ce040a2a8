import math

import pytest

from llmforge.config.recipe import TrainConfig
from llmforge.train.schedule import lr_at


def cfg(**kw):
    base = dict(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_is_linear_from_near_zero():
    c = cfg()
    assert [lr_at(s, c) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_reaches_min_lr_and_is_monotone():
    c = cfg(schedule="cosine")
    lrs = [lr_at(s, c) for s in range(10, 101)]
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(55, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_holds_then_decays_linearly():
    c = cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(10, c) == lr_at(79, c) == 1.0
    assert lr_at(80, c) < 1.0
    assert lr_at(99, c) == pytest.approx(0.1)
    assert lr_at(89, c) == pytest.approx(1.0 + (0.1 - 1.0) * 10 / 20)


def test_constant():
    c = cfg(schedule="constant")
    assert lr_at(50, c) == lr_at(99, c) == 1.0
