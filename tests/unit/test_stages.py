"""Data schedules: the batch warmup's sequence, stages resolved to steps and samples, the staged sample order (a
switch at the right sample, per-source counts as weighted, the same samples at any data-parallel size), the LR decay
over an anneal stage, and the recipe checks."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from llmforge.config import load_recipe
from llmforge.config.data import DatasetSpec, StageSpec
from llmforge.config.parallel import Layout
from llmforge.config.recipe import BatchWarmupConfig, EvalConfig, SpikeGuardConfig, TrainConfig
from llmforge.data.loader import BlendedOrder, PretrainData, micro_batch_indices, next_micro_batch
from llmforge.data.stages import BatchRamp, StagePlan, batch_ramp, check_batch_ramp
from llmforge.errors import RecipeError
from llmforge.train.schedule import lr_at
from llmforge.train.trainer import TrainerConfig
from tests.helpers import write_recipe


def megatron_batch(consumed: int, start: int, increment: int, ramp_samples: int, final: int) -> int:
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, as published (float span per increase)."""
    steps = (final - start) // increment
    per_increment = ramp_samples / steps
    if consumed > ramp_samples:
        return final
    return min(final, start + int(consumed / per_increment) * increment)


def test_batch_ramp_sequence_is_the_hand_computed_one():
    # 4 -> 16 by 4 over the first 40 samples: increases at samples 14 (ceil 40/3), 27, 40.
    ramp = BatchRamp(16, start=4, increment=4, ramp_samples=40)
    batches, consumed = [], 0
    for step in range(10):
        assert ramp.consumed_at(step) == consumed
        batches.append(ramp.batch_at(consumed))
        consumed += batches[-1]
    # samples before each step: 0 4 8 12 | 16 24 | 32 | 44 60 76
    assert batches == [4, 4, 4, 4, 8, 8, 12, 16, 16, 16]
    assert ramp.values() == [4, 8, 12, 16]
    for samples in range(0, 200):  # the first step boundary at or past any sample count
        step = ramp.step_reaching(samples)
        assert ramp.consumed_at(step) >= samples and (step == 0 or ramp.consumed_at(step - 1) < samples)


@pytest.mark.parametrize("start, increment, ramp_samples, final", [(32, 32, 10_000, 512), (8, 24, 777, 56)])
def test_batch_ramp_follows_megatrons_rule(start, increment, ramp_samples, final):
    ramp = BatchRamp(final, start, increment, ramp_samples)
    consumed = 0
    while consumed < ramp_samples + 3 * final:
        assert ramp.batch_at(consumed) == megatron_batch(consumed, start, increment, ramp_samples, final), consumed
        consumed += ramp.batch_at(consumed)


def test_no_warmup_is_the_constant_batch():
    ramp = batch_ramp(TrainConfig(micro_batch_size=4, grad_accum_steps=2), 64, 2)
    assert not ramp.ramps and ramp.batch_at(0) == ramp.batch_at(10**9) == 16 and ramp.consumed_at(7) == 112


def test_batch_warmup_checks():
    def problem(**kw):
        t = TrainConfig(micro_batch_size=2, grad_accum_steps=8, batch_warmup=BatchWarmupConfig(**kw))
        return check_batch_ramp(t, 64, 2)  # full batch 32

    assert problem(start=8, tokens=64 * 100) is None
    assert "not below" in problem(start=32, tokens=6400)
    assert "whole number of increment=10" in problem(start=8, increment=10, tokens=6400)
    assert "multiples of 4" in problem(start=6, increment=2, tokens=6400)
    assert "fewer than one sequence" in problem(start=8, tokens=64)
    with pytest.raises(ValueError, match="tokens: must be > 0 when start is set"):
        BatchWarmupConfig(start=8)


def test_stages_resolve_to_steps_and_samples_under_the_ramp():
    ramp = BatchRamp(16, start=4, increment=4, ramp_samples=40)  # steps start at samples 0 4 8 12 16 24 32 44 ...
    specs = [
        StageSpec(name="a", steps=5),  # steps 0-4: samples 0..24
        StageSpec(name="b", tokens=20 * 64, weights={"x": 1}),  # 20 more samples: 24 -> 44 at step 7
        StageSpec(name="c", weights={"x": 1, "y": 3}, lr_decay=True),
    ]
    plan = StagePlan.build(specs, ["x", "y"], [2.0, 1.0], 64, 10, ramp)
    got = [(s.name, s.first_step, s.end_step, s.first_sample, s.end_sample, s.weights) for s in plan.stages]
    assert got == [
        ("a", 0, 5, 0, 24, [2.0, 1.0]),
        ("b", 5, 7, 24, 44, [1.0, 0.0]),
        ("c", 7, 10, 44, 92, [1.0, 3.0]),
    ]
    assert plan.at_sample(43).name == "b" and plan.at_sample(44).name == "c"
    assert plan.decay_window() == (7, 3)
    with pytest.raises(ValueError, match="ends at step 7; train.max_steps is 9: set train.max_steps: 7"):
        StagePlan.build([StageSpec(steps=5), StageSpec(tokens=20 * 64)], ["x"], [1.0], 64, 9, ramp)
    with pytest.raises(ValueError, match="stage 2 .* ends at step 12; train.max_steps is 10"):
        StagePlan.build([StageSpec(steps=5), StageSpec(steps=7), StageSpec()], ["x"], [1.0], 64, 10, ramp)


def test_lr_decays_over_the_anneal_stage():
    t = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.5)
    window = (80, 20)  # an anneal stage of steps 81-100 (0-based 80-99)
    assert lr_at(60, t, window) == lr_at(79, t, window) == 1.0  # decay_fraction's 50 steps are not used
    assert lr_at(60, t) < 1.0
    assert lr_at(80, t, window) == pytest.approx(1.0 - 0.9 * 1 / 20)
    assert lr_at(99, t, window) == pytest.approx(0.1)


def test_staged_order_switches_at_the_stage_and_continues_each_dataset():
    sizes = [500, 300, 200]
    order = BlendedOrder(sizes, [1, 1, 1], seed=3, stages=[(0, [3.0, 1.0, 0.0]), (400, [0.0, 1.0, 1.0])])
    picks = [order.locate(g) for g in range(800)]
    first, second = Counter(d for d, _ in picks[:400]), Counter(d for d, _ in picks[400:])
    assert first == {0: 300, 1: 100} and second == {1: 200, 2: 200}
    assert order.samples_by_dataset(400) == [300, 100, 0] and order.samples_by_dataset(800) == [300, 300, 200]
    # dataset 1 read in both stages: 300 windows, each once (its permutation goes on where stage 1 left it)
    assert sorted(i for d, i in picks if d == 1) == list(range(300))
    # the first stage is the order the same two datasets and weights give without stages
    plain = BlendedOrder(sizes[:2], [3.0, 1.0], seed=3)
    assert [plain.locate(g) for g in range(400)] == picks[:400]


def _step_samples(cfg: TrainerConfig, steps: int, rank: int, start: int = 0) -> list[list[int]]:
    """The global sample indices one rank reads in each step from sample `start`, following the trainer's
    read-ahead order (TrainerConfig.batch_at + next_micro_batch)."""
    out, key = [], (start, 0)
    for _ in range(steps):
        batch, accum = cfg.batch_at(key[0])
        read = []
        for _ in range(accum):
            read.extend(micro_batch_indices(key[0], key[1], rank, cfg.layout.data, cfg.schedule.micro_batch_size))
            key = next_micro_batch(*key, accum, batch)
        out.append(read)
    return out


def trainer_cfg(world: int, rank: int = 0) -> TrainerConfig:
    t = TrainConfig(
        micro_batch_size=1, grad_accum_steps=16 // world, batch_warmup=BatchWarmupConfig(start=4, tokens=64 * 24)
    )
    layout = Layout(world, rank=rank)
    return TrainerConfig(
        t, layout, SpikeGuardConfig(), EvalConfig(), 1, 0, 0, 0.0, None, ramp=batch_ramp(t, 64, layout.data)
    )


def test_every_data_parallel_size_reads_the_same_samples_per_step():
    """The ramp (4 -> 16 sequences) read on 1, 2 or 4 replicas: each step covers the same global samples, so a resume
    at another size (the step's first sample is all it keeps) lands on the same next sample."""
    one = _step_samples(trainer_cfg(1), 12, 0)
    # 4 -> 16 by 4 over the first 24 samples: increases at samples 8, 16 and 24
    assert [len(s) for s in one] == [4, 4, 8, 12] + [16] * 8
    assert [s[0] for s in one] == [0, 4, 8, 16, 28, 44, 60, 76, 92, 108, 124, 140]
    assert all(s == list(range(s[0], s[0] + len(s))) for s in one)
    for world in (2, 4):
        ranks = [_step_samples(trainer_cfg(world, r), 12, r) for r in range(world)]
        for step in range(12):
            together = sorted(i for r in range(world) for i in ranks[r][step])
            assert together == one[step], (world, step)
    # resumed after step 3 (sample 16, inside the ramp) on 4 replicas: the rest of the 1-replica run
    resumed = [_step_samples(trainer_cfg(4, r), 9, r, start=16) for r in range(4)]
    assert [sorted(i for r in range(4) for i in resumed[r][s]) for s in range(9)] == one[3:]


@pytest.fixture()
def two_sources(tmp_path, prepared):
    """Two real datasets: the prepared stdlib text and a copy of it under another name."""
    a, b = prepared / "prepared" / "stdlib", tmp_path / "other"
    shutil.copytree(a, b)
    return [DatasetSpec(str(a), 1.0, "web"), DatasetSpec(str(b), 1.0, "curated")]


def test_source_tokens_follow_the_stage_weights(two_sources):
    data = PretrainData(two_sources, 64, seed=5)
    ramp = BatchRamp(8)
    plan = StagePlan.build(
        [StageSpec(name="stable", steps=300, weights={"web": 7, "curated": 3}), StageSpec(weights={"curated": 1})],
        data.names,
        data.weights,
        64,
        400,
        ramp,
    )
    data.use_stages(plan)
    picks = Counter(data.order.locate(g)[0] for g in range(2400))
    assert picks == {0: 1680, 1: 720}  # 7:3 over the stable stage's 2,400 samples
    assert data.tokens_by_source(2400) == {"web": 1680 * 64, "curated": 720 * 64}
    assert data.tokens_by_source(3200) == {"web": 1680 * 64, "curated": 1520 * 64}
    # the rows read are those windows: sample 2400 on comes from the curated copy's windows
    x, _ = data.batch(range(2400, 2408))
    want = [data.windows[1][data.order.locate(g)[1]][:-1] for g in range(2400, 2408)]
    assert all((x[i].numpy() == want[i]).all() for i in range(8))


def test_stage_recipe_checks(tmp_path, prepared):
    def load(**data):
        path = write_recipe(tmp_path / "r.yaml", prepared, tmp_path / "runs", data=data, train={"schedule": "wsd"})
        return load_recipe(str(path))

    assert load(stages=[{"steps": 4, "weights": {"stdlib": 1}}, {}]).data.stages[1].name == "stage2"
    with pytest.raises(RecipeError, match=r"data.stages\[0\].weights.web: no dataset of that name; the datasets are"):
        load(stages=[{"steps": 4, "weights": {"web": 1}}])
    with pytest.raises(RecipeError, match=r"data.stages\[0\]: needs steps or tokens"):
        load(stages=[{}, {"steps": 3}])
    with pytest.raises(RecipeError, match=r"lr_decay: only the last stage"):
        load(stages=[{"steps": 3, "lr_decay": True}, {}])
    with pytest.raises(RecipeError, match="give steps or tokens, not both"):
        load(stages=[{"steps": 3, "tokens": 100}])
    with pytest.raises(RecipeError, match="must be a number >= 0"):
        load(stages=[{"weights": {"stdlib": -1}}])
    path = write_recipe(
        tmp_path / "c.yaml", prepared, tmp_path / "runs", data={"stages": [{"lr_decay": True}]}, train={}
    )
    with pytest.raises(RecipeError, match="set train.schedule: wsd"):
        load_recipe(str(path))
