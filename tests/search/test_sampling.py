"""Tests for lightning_dbq.search.sampling (HASB roulette), against brute force and closed forms."""

from __future__ import annotations

import math
import os
import random
import tempfile
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dbq.search.sampling import (
    HASBSampler,
    bit_probabilities,
    sensitive_layers,
    sensitivity_threshold,
    step_generator,
    switch_probability,
)

BITS = [8, 6, 4, 2]
CHI2_DF3_ALPHA_1E3 = 16.27  # critical value of chi-square with 3 degrees of freedom at alpha = 1e-3
HAND_TRACES = [5, 0.1, 0.2, 3, 0.05, 0.3, 0.02, 0.01]
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def chi_square(counts: np.ndarray, probs: list[float]) -> float:
    expected = np.asarray(probs) * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_hand_made_traces_mean_threshold() -> None:
    assert sensitivity_threshold(HAND_TRACES) == pytest.approx(1.085)
    assert sensitive_layers(HAND_TRACES) == [i in (0, 3) for i in range(8)]


def test_topk_threshold_k1_and_k2() -> None:
    assert sensitivity_threshold(HAND_TRACES, "topk", 1) == 5
    assert sensitive_layers(HAND_TRACES, "topk", 1) == [i == 0 for i in range(8)]
    assert sensitivity_threshold(HAND_TRACES, "topk", 2) == 4
    assert sensitive_layers(HAND_TRACES, "topk", 2) == [i == 0 for i in range(8)]


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=12))
def test_topk_with_k_equal_l_is_mean_mode_and_matches_brute_force(traces: list[float]) -> None:
    assert sensitive_layers(traces, "topk", len(traces)) == sensitive_layers(traces, "mean")
    for k in range(1, len(traces) + 1):
        tau = sum(Fraction(t) for t in sorted(traces, reverse=True)[:k]) / k  # exact brute force
        assert sensitive_layers(traces, "topk", k) == [Fraction(t) >= tau for t in traces]
        assert any(sensitive_layers(traces, "topk", k))  # the maximum is always >= a mean of top values


def test_ties_are_sensitive() -> None:
    # mean of [0.1]*3 in floating point is 0.10000000000000002 > 0.1; the exact comparison keeps them all
    assert sensitive_layers([0.1, 0.1, 0.1]) == [True, True, True]
    assert sensitive_layers([2.0, 2.0, 1.0, 1.0], "topk", 1) == [True, True, False, False]
    assert sensitive_layers([2.0, 2.0, 1.0, 1.0], "topk", 2) == [True, True, False, False]
    assert sensitive_layers([2.0, 2.0, 1.0, 1.0], "topk", 3) == [True, True, False, False]
    assert sensitive_layers([3.0, 1.0, 1.0, 1.0], "topk", 4) == [True, False, False, False]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], "mean", None), "traces"),
        (([1.0, math.nan], "mean", None), "finite"),
        (([1.0, 2.0], "median", None), "mode"),
        (([1.0, 2.0], "topk", None), "top_k"),
        (([1.0, 2.0], "topk", 3), "top_k"),
        (([1.0, 2.0], "topk", 0), "top_k"),
        (([1.0, 2.0], "mean", 1), "top_k"),
    ],
)
def test_threshold_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sensitive_layers(*args)


def test_switch_probability_schedule_is_linear_and_monotone() -> None:
    sigma0, E = 0.5, 10
    values = [switch_probability(sigma0, e, E) for e in range(E)]
    assert values == pytest.approx([sigma0 * (e + 1) / E for e in range(E)], rel=1e-15)
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    assert values[0] == pytest.approx(0.05)
    assert values[-1] == pytest.approx(sigma0)
    # not compounded: sigma_e never depends on sigma_{e-1} (the compounding bug gives 1.8e-4 at the end)
    assert values[-1] > 1000 * math.prod((e + 1) / E for e in range(E)) * sigma0
    assert switch_probability(0.0, 3, 5) == 0.0


@pytest.mark.parametrize(
    ("args", "match"),
    [((1.5, 0, 10), "sigma0"), ((-0.1, 0, 10), "sigma0"), ((0.5, 10, 10), "epoch"), ((0.5, -1, 10), "epoch")]
    + [((0.5, 0, 0), "max_epochs")],
)
def test_switch_probability_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        switch_probability(*args)


def test_bit_probabilities() -> None:
    assert bit_probabilities(BITS, sensitive=True) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert bit_probabilities(BITS, sensitive=False) == pytest.approx([0.25] * 4)
    p = bit_probabilities([4, 3, 2], sensitive=True)
    assert sum(b * q for b, q in zip([4, 3, 2], p, strict=True)) == pytest.approx(
        (16 + 9 + 4) / 9
    )  # E[b] = sum b^2 / sum b
    for bad in ([], [8, 8], [8, 0], [8.0, 4]):
        with pytest.raises(ValueError, match="bits"):
            bit_probabilities(bad, sensitive=True)  # type: ignore[arg-type]


def test_chi_square_goodness_of_fit() -> None:
    sampler = HASBSampler(["sens", "insens"], BITS, [True, False], seed=3)
    current = {"sens": 8, "insens": 8}
    N = 20_000
    draws = [sampler.sample(current, step, 0, sigma=1.0) for step in range(N)]
    for layer, sensitive in (("sens", True), ("insens", False)):
        counts = np.array([sum(d[layer] == b for d in draws) for b in BITS], dtype=np.float64)
        assert counts.sum() == N
        stat = chi_square(counts, bit_probabilities(BITS, sensitive))
        assert stat < CHI2_DF3_ALPHA_1E3, (layer, counts / N, stat)
    # the test has power: the sensitive draws are far from uniform
    counts = np.array([sum(d["sens"] == b for d in draws) for b in BITS], dtype=np.float64)
    assert chi_square(counts, [0.25] * 4) > 100 * CHI2_DF3_ALPHA_1E3


def test_switch_rate() -> None:
    sigma, N = 0.3, 20_000
    sampler = HASBSampler(["a"], [8, 2], None, seed=5)
    # from 3 bits, which no draw can produce, every switch is visible
    switched = sum(sampler.sample({"a": 3}, step, 1, sigma)["a"] != 3 for step in range(N))
    assert abs(switched / N - sigma) < 4 * math.sqrt(sigma * (1 - sigma) / N)
    assert all(sampler.sample({"a": 3}, s, 0, 0.0)["a"] == 3 for s in range(200))


def test_same_draws_regardless_of_global_rng() -> None:
    layers = [f"l{i}" for i in range(12)]
    sens = [i % 3 == 0 for i in range(12)]
    current = dict.fromkeys(layers, 8)

    def rank(global_seed: int) -> list[dict[str, int]]:
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        np.random.seed(global_seed)
        sampler = HASBSampler(layers, BITS, sens, seed=42)
        out = []
        for step in range(50):
            torch.rand(global_seed % 7 + 1)  # extra, rank-dependent global draws in between
            np.random.rand(3)
            out.append(sampler.sample(current, step, step % 4, sigma=0.6))
        return out

    assert rank(0) == rank(1234)
    other = HASBSampler(layers, BITS, sens, seed=43)
    assert rank(0) != [other.sample(current, s, s % 4, 0.6) for s in range(50)]


def test_step_generator_is_a_function_of_its_arguments() -> None:
    before = torch.get_rng_state()
    a = torch.rand(5, generator=step_generator(1, 2, 3))
    torch.rand(10)
    b = torch.rand(5, generator=step_generator(1, 2, 3))
    assert torch.equal(a, b)
    for args in ((1, 2, 4), (1, 3, 3), (2, 2, 3), (1, 3, 2)):
        assert not torch.equal(a, torch.rand(5, generator=step_generator(*args)))
    assert step_generator(0, 0, 0).device.type == "cpu"
    with pytest.raises(ValueError, match="global_step"):
        step_generator(0, -1, 0)
    torch.set_rng_state(before)


def test_uniform_baseline() -> None:
    a = HASBSampler(["x", "y"], BITS, [True, True], uniform=True)
    b = HASBSampler(["x", "y"], BITS, None)
    for sampler in (a, b):
        assert sampler.probabilities() == {"x": [0.25] * 4, "y": [0.25] * 4}
        assert not sampler.is_sensitive("x")
    current = {"x": 4, "y": 4}
    assert [a.sample(current, s, 0, 0.7) for s in range(30)] == [b.sample(current, s, 0, 0.7) for s in range(30)]


def test_resume_from_state_dict_draws_the_same_sequence() -> None:
    layers = ["conv1", "layer1.0", "fc"]
    sampler = HASBSampler(layers, BITS, [True, False, True], seed=9)
    current = dict.fromkeys(layers, 8)
    state = sampler.state_dict()
    assert state == {"layers": layers, "bits": BITS, "sensitive": [True, False, True], "seed": 9, "uniform": False}
    first = []
    for step in range(40):
        current = sampler.sample(current, step, 0, 0.5)
        first.append(current)
    resumed = HASBSampler.from_state_dict(state)
    other = HASBSampler(["z"], [2], None)
    other.load_state_dict(state)
    for s in (resumed, other):
        current = dict.fromkeys(layers, 8)
        again = []
        for step in range(40):
            current = s.sample(current, step, 0, 0.5)
            again.append(current)
        assert again == first
    # resuming mid-run: the draws at step k depend only on (seed, k, bit_index, current)
    assert resumed.sample(first[19], 20, 0, 0.5) == first[20]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": []}, "layers"),
        ({"layers": ["a", "a"]}, "layers"),
        ({"bits": [8, 8]}, "bits"),
        ({"sensitive": [True]}, "sensitive"),
        ({"seed": -1}, "seed"),
    ],
)
def test_sampler_constructor_errors(kwargs: dict, match: str) -> None:
    args: dict = {"layers": ["a", "b"], "bits": BITS, "sensitive": [True, False]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        HASBSampler(args.pop("layers"), args.pop("bits"), args.pop("sensitive"), **args)


def test_sample_errors() -> None:
    sampler = HASBSampler(["a", "b"], BITS, None)
    with pytest.raises(ValueError, match="current"):
        sampler.sample({"a": 8}, 0, 0, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        sampler.sample({"a": 8, "b": 8}, 0, 0, 1.5)
    with pytest.raises(ValueError, match="expected keys"):
        sampler.load_state_dict({"layers": ["a"]})


def _gloo_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different global RNG per rank
        layers = [f"l{i}" for i in range(6)]
        sampler = HASBSampler(layers, BITS, [True, False] * 3, seed=7)
        current = dict.fromkeys(layers, 8)
        codes = []
        for step in range(20):
            torch.rand(rank + 1)
            current = sampler.sample(current, step, step % 2, 0.5)
            codes.append([current[name] for name in layers])
        mine = torch.tensor(codes)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise AssertionError(f"rank {rank}: configurations differ across ranks")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_ranks_draw_identical_configurations() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children reuse the imported torch (spawn re-imports it: > 10 s on a busy 2-core box)
        args = (2, os.path.join(tmp, "init"))
        mp.start_processes(_gloo_worker, args=args, nprocs=2, join=True, start_method="fork")
