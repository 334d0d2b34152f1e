"""Mixing policies: realized task frequencies match each policy's formula (see mtl_lightning.data.policies),
deterministic schedules are followed exactly, bad options raise clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from mtl_lightning.data.mixing import TaskMixingSampler
from mtl_lightning.data.policies import (
    AllTasks,
    Annealed,
    Explicit,
    Proportional,
    RoundRobin,
    Scheduled,
    Temperature,
    Uniform,
    resolve_policy,
)

SIZES = {"big": 1000, "mid": 300, "small": 60}
STEPS = 20000


def realized_counts(policy, epoch: int = 0, sizes=SIZES, steps: int = STEPS, num_epochs=None, seed: int = 0) -> np.ndarray:
    """Steps per task in one epoch of the real sampler (its plans, not the policy's probabilities)."""
    policy.bind(sizes, num_epochs)
    sampler = TaskMixingSampler(policy, sizes, batch_size=4, seed=seed, steps_per_epoch=steps)
    names = list(sizes)
    counts = np.zeros(len(names))
    for plan in sampler.epoch_plan(epoch):
        assert len(plan) == 1, "one-task policies train exactly one task per step"
        counts[names.index(plan[0][0])] += 1
    return counts


def assert_matches(counts: np.ndarray, expected_p: np.ndarray) -> None:
    """Every task's count within 4 standard deviations of its binomial expectation."""
    n = counts.sum()
    expected_p = expected_p / expected_p.sum()
    sigma = np.sqrt(n * expected_p * (1 - expected_p))
    assert np.all(np.abs(counts - n * expected_p) <= 4 * sigma + 1e-9), (counts / n, expected_p)


n = np.array(list(SIZES.values()), dtype=float)


def test_uniform_frequencies():
    assert_matches(realized_counts(Uniform()), np.ones(3))


def test_proportional_frequencies_without_and_with_cap():
    assert_matches(realized_counts(Proportional()), n)
    assert_matches(realized_counts(Proportional(cap=200)), np.array([200.0, 200.0, 60.0]))


@pytest.mark.parametrize("tau", [1.0, 2.0, 1 / 0.3])
def test_temperature_frequencies(tau):
    assert_matches(realized_counts(Temperature(tau)), n ** (1 / tau))


def test_frequency_check_detects_a_wrong_formula():
    # The bound is tight enough to tell τ = 2 from proportional sampling.
    with pytest.raises(AssertionError):
        assert_matches(realized_counts(Temperature(2.0)), n)


def test_annealed_follows_stickland_murray_schedule():
    policy = Annealed(num_epochs=5)
    policy.bind(SIZES)
    # α = 1 − 0.8 (e − 1)/(E − 1) for e = 1..5, held after the last epoch.
    assert [policy.alpha(e) for e in range(6)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    for epoch in (0, 2, 4):
        expected = n ** (1 - 0.8 * epoch / 4)
        assert torch.allclose(policy.probabilities(0, epoch), torch.tensor(expected / expected.sum(), dtype=torch.float32))
        assert_matches(realized_counts(Annealed(num_epochs=5), epoch=epoch), expected)


def test_annealed_takes_trainer_epochs_and_needs_some():
    policy = Annealed()
    policy.bind(SIZES, num_epochs=3)
    assert policy.alpha(1) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="num_epochs"):
        Annealed().bind(SIZES, num_epochs=-1)


def test_round_robin_is_exact_across_epochs():
    policy = RoundRobin()
    policy.bind(SIZES)
    sampler = TaskMixingSampler(policy, SIZES, batch_size=8, steps_per_epoch=7)
    names = list(SIZES)
    for epoch in range(3):
        tasks = [plan[0][0] for plan in sampler.epoch_plan(epoch)]
        assert tasks == [names[(epoch * 7 + i) % 3] for i in range(7)]


def test_explicit_probabilities_are_normalised_and_followed():
    counts = realized_counts(Explicit({"big": 2.0, "mid": 1.0, "small": 1.0}))
    assert_matches(counts, np.array([0.5, 0.25, 0.25]))
    assert realized_counts(Explicit({"big": 0.0, "mid": 1.0, "small": 0.0}), steps=500)[[0, 2]].sum() == 0


def warm_start(step: int):
    """A schedule used by the tests through its dotted path."""
    return "small" if step < 50 else {"big": 0.0, "mid": 1.0, "small": 1.0}


def test_scheduled_by_dotted_path_follows_the_function_of_the_step():
    policy = Scheduled(f"{__name__}.warm_start")
    policy.bind(SIZES)
    sampler = TaskMixingSampler(policy, SIZES, batch_size=4, steps_per_epoch=2000)
    tasks = [plan[0][0] for plan in sampler.epoch_plan(0)]
    assert tasks[:50] == ["small"] * 50
    counts = np.array([tasks[50:].count(t) for t in SIZES], dtype=float)
    assert counts[0] == 0
    assert_matches(counts[1:], np.array([1.0, 1.0]))
    # The step is global: the second epoch continues the schedule (no warm start again).
    second = [plan[0][0] for plan in sampler.epoch_plan(1)]
    assert second[:50] != ["small"] * 50 and second.count("big") == 0


def test_the_example_schedule_of_the_experiments_imports():
    policy = Scheduled("experiments.domain_digits.schedules.original_then_uniform")
    policy.bind({"original": 10, "transposed": 10, "inverted": 10})
    assert policy.probabilities(0, 0).tolist() == [1.0, 0.0, 0.0]
    assert policy.probabilities(100, 0).tolist() == pytest.approx([1 / 3] * 3)


def test_same_seed_same_sequence_other_seed_other_sequence():
    a = realized_counts(Uniform(), steps=300, seed=1)
    policy = Uniform()
    policy.bind(SIZES)
    plans = [TaskMixingSampler(policy, SIZES, 4, seed=s, steps_per_epoch=300).epoch_plan(0) for s in (1, 1, 2)]
    as_lists = [[(t, i.tolist()) for plan in p for t, i in plan] for p in plans]
    assert as_lists[0] == as_lists[1] != as_lists[2]
    assert a.sum() == 300


@pytest.mark.parametrize("mode", ["max_size_cycle", "min_size", "max_size"])
def test_all_tasks_modes_match_lightning_combined_loader(mode):
    sizes = {"a": 50, "b": 20, "c": 33}
    loaders = {t: DataLoader(range(k), batch_size=8) for t, k in sizes.items()}
    combined = CombinedLoader(loaders, mode=mode)
    iter(combined)
    reference = [[batch[t] is not None for t in sizes] for batch, _, _ in combined]
    policy = AllTasks(mode)
    policy.bind(sizes)
    sampler = TaskMixingSampler(policy, sizes, batch_size=8)
    steps = sampler.task_steps(0, torch.Generator())
    assert len(sampler) == len(reference)
    assert [[i in task_steps for task_steps in steps] for i in range(len(sampler))] == reference


def test_shorthands_resolve_and_bad_policies_raise():
    assert isinstance(resolve_policy("temperature"), Temperature)
    assert resolve_policy("all").tasks_per_step == "all" and resolve_policy("uniform").tasks_per_step == "one"
    with pytest.raises(ValueError, match="Unknown mixing policy 'uniformm'"):
        resolve_policy("uniformm")
    with pytest.raises(ValueError, match="needs arguments"):
        resolve_policy("explicit")
    with pytest.raises(ValueError, match="mode must be one of"):
        AllTasks("sequential")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="cap must be a positive"):
        Proportional(cap=0)
    with pytest.raises(ValueError, match="num_epochs must be >= 1"):
        Annealed(num_epochs=0)


@pytest.mark.parametrize(
    "probabilities, message",
    [
        ({"big": 1, "mid": 1, "small": 1, "huge": 1}, r"unknown task\(s\) \['huge'\]"),
        ({"big": 1, "mid": 1}, r"no probability for task\(s\) \['small'\]"),
        ({"big": 1, "mid": -0.5, "small": 1}, "negative or non-finite"),
        ({"big": 0, "mid": 0, "small": 0}, "all zero"),
    ],
)
def test_explicit_rejects_bad_probabilities(probabilities, message):
    with pytest.raises(ValueError, match=message):
        Explicit(probabilities).bind(SIZES)


def test_scheduled_rejects_bad_functions_and_outputs():
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        Scheduled(f"{__name__}.nope")
    with pytest.raises(ValueError, match="not a dotted path"):
        Scheduled("warm_start")
    policy = Scheduled(lambda step: "unknown")
    policy.bind(SIZES)
    with pytest.raises(ValueError, match="returned unknown task 'unknown'"):
        policy.probabilities(0, 0)
    policy = Scheduled(lambda step: 3)
    policy.bind(SIZES)
    with pytest.raises(ValueError, match="must return a task name"):
        policy.probabilities(0, 0)


def test_sampler_rejects_bad_options():
    policy = Uniform()
    policy.bind(SIZES)
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        TaskMixingSampler(policy, SIZES, 4, steps_per_epoch=0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        TaskMixingSampler(policy, SIZES, 4, rank=2, world_size=2)
    all_min = AllTasks("min_size")
    all_min.bind(SIZES)
    with pytest.raises(ValueError, match="needs AllTasks\\(mode='max_size_cycle'\\)"):
        TaskMixingSampler(all_min, SIZES, 4, steps_per_epoch=10)
    with pytest.raises(ValueError, match="at least one training sample"):
        Uniform().bind({"a": 0, "b": 3})
