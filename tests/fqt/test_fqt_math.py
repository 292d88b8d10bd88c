"""Pure math of gradient quantization: the stochastic-rounding group quantizer, water-filling, top-K, BHQ plan,
config validation and the registry. References are NumPy / brute force, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dbq.fqt import options
from lightning_dbq.fqt.bhq import householder_max, householder_plan
from lightning_dbq.fqt.config import GradQuantConfig
from lightning_dbq.fqt.grad_quant import GRAD_METHODS
from lightning_dbq.fqt.prune import group_weights, keep_count, topk_mask, water_fill
from lightning_dbq.fqt.quantizer import dequantize, group_codes, quantize_rows


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------- group quantizer


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_are_integers_in_range_and_follow_the_formula(bits: int) -> None:
    rows = torch.randn(6, 50, dtype=torch.float64) * torch.tensor([1e-3, 1, 10, 100, 0.5, 3.0])[:, None]
    gen = _gen(1)
    q, s, z = group_codes(rows, bits, gen)
    levels = 2**bits - 1
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= levels
    lo, hi = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    torch.testing.assert_close(z, lo - 1e-8)
    torch.testing.assert_close(s, levels / (hi - lo + 2e-8))
    # the same noise drawn independently: q = clamp(floor((r - z)·S + U), 0, B)
    u = torch.rand(rows.shape, generator=_gen(1), dtype=torch.float64)
    expected = np.clip(np.floor((rows.numpy() - z.numpy()) * s.numpy() + u.numpy()), 0, levels)
    np.testing.assert_array_equal(q.numpy(), expected)


def test_one_bit_gives_the_group_min_or_max() -> None:
    rows = torch.randn(5, 40, dtype=torch.float64)
    est = quantize_rows(rows, 1, _gen(2))
    lo, hi = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    at_min, at_max = (est - lo).abs() < 1e-7, (est - hi).abs() < 1e-7
    assert bool((at_min | at_max).all())
    assert at_min.any() and at_max.any()


def test_all_zero_group_gives_exact_zeros_and_constant_group_is_exact_enough() -> None:
    rows = torch.randn(4, 30, dtype=torch.float64)
    rows[1] = 0.0
    rows[2] = 0.75
    for bits in (1, 4, 16):
        est = quantize_rows(rows, bits, _gen(bits))
        assert torch.equal(est[1], torch.zeros(30, dtype=torch.float64))
        assert (est[2] - 0.75).abs().max() < 1e-7
    q, s, z = group_codes(torch.zeros(3, 7), 4, _gen())
    assert torch.equal(dequantize(q, s, z), torch.zeros(3, 7))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_group_quantizer_is_unbiased_elementwise(bits: int) -> None:
    """Mean of T draws → r, with error within 5 standard errors (per-element variance <= (R/B)²/4)."""
    rows = torch.randn(3, 20, dtype=torch.float64) * torch.tensor([0.1, 1.0, 7.0])[:, None]
    gen, t = _gen(3), 2000
    total = torch.zeros_like(rows)
    for _ in range(t):
        total += quantize_rows(rows, bits, gen)
    bound = (rows.max(1, keepdim=True).values - rows.min(1, keepdim=True).values) / (2**bits - 1) / 2
    assert bool(((total / t - rows).abs() <= 5 * bound / t**0.5 + 1e-12).all())


def test_half_precision_input_is_quantized_in_float32() -> None:
    rows = (torch.randn(4, 64) * 1e-3).half()
    est = quantize_rows(rows, 8, _gen())
    assert est.dtype == torch.float16 and torch.isfinite(est).all()
    step = float(rows.float().max(1).values.max() - rows.float().min(1).values.min()) / 255
    assert float((est.float() - rows.float()).abs().max()) <= step + 4e-6  # one step, plus fp16 output rounding


# ---------------------------------------------------------------- water-filling


def _bisection_reference(w: np.ndarray, k: float) -> np.ndarray:
    """p_i = min(1, c·w_i) with Σp = k by bisection on c (independent of the sorted closed form)."""
    if (w > 0).sum() <= k:
        return (w > 0).astype(float)
    lo, hi = 0.0, 1.0
    while np.minimum(1.0, hi * w).sum() < k:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(1.0, mid * w).sum() < k else (lo, mid)
    return np.minimum(1.0, hi * w)


@pytest.mark.parametrize(
    ("weights", "k"),
    [
        ([1.0, 2.0, 3.0, 4.0], 2.0),  # no saturation: p ∝ w
        ([100.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2.0),  # the big group saturates
        ([50.0, 40.0, 1.0, 2.0, 0.0, 3.0, 0.0], 3.0),  # two saturate, zero weights get p = 0
        ([5.0, 0.0, 0.0], 2.0),  # fewer positive groups than k: every positive one kept
        ([3.0, 3.0, 3.0], 3.0),  # keep everything
        ([1.0, 2.0, 3.0], 0.4),  # k < 1 (the caller floors K at 1, the math does not need it)
    ],
)
def test_water_fill_matches_bisection(weights: list[float], k: float) -> None:
    w = np.asarray(weights)
    p = water_fill(torch.tensor(w), k).numpy()
    ref = _bisection_reference(w, k)
    np.testing.assert_allclose(p, ref, atol=1e-9)
    assert (p <= 1.0).all() and (p >= 0).all()
    assert p.sum() == pytest.approx(min(k, (w > 0).sum()), abs=1e-9)
    assert (p[w == 0] == 0).all()
    free = (p < 1) & (w > 0)
    if free.sum() > 1:  # below saturation p ∝ w: one constant c
        np.testing.assert_allclose(p[free] / w[free], (p[free] / w[free])[0], rtol=1e-12)


def test_water_fill_random_cases_against_bisection() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = int(rng.integers(1, 40))
        w = np.exp(rng.normal(0, 2, g)) * (rng.random(g) > 0.2)
        k = keep_count(g, float(rng.uniform(0.01, 1.0)))
        p = water_fill(torch.tensor(w), k).numpy()
        np.testing.assert_allclose(p, _bisection_reference(w, k), atol=1e-9)
        assert p.sum() == pytest.approx(min(k, (w > 0).sum()), abs=1e-9)


def test_keep_count_and_group_weights() -> None:
    assert keep_count(128, 0.25) == 32.0
    assert keep_count(3, 0.1) == 1.0  # at least one group
    assert keep_count(4, 1.0) == 4.0
    rows = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [-1.0, 3.0, 0.0]])
    assert group_weights(rows).tolist() == [0.0, 2.0, 4.0]  # constant non-zero row: max|g|, not 0


def test_topk_mask_keeps_the_largest_max_abs_rows() -> None:
    rows = torch.tensor([[0.1, -0.2], [5.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    assert topk_mask(rows, 0.5).tolist() == [False, True, True, False]
    assert topk_mask(rows, 0.1).tolist() == [False, True, False, False]  # int(0.4) = 0 → at least one


# ---------------------------------------------------------------- BHQ plan


def _dense(plan, n: int) -> torch.Tensor:
    return plan.apply(torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("size", [2, 3, 5, 17])
def test_householder_max_matches_explicit_matrix(size: int) -> None:
    e1 = np.eye(size)[0]
    u = np.ones(size) / np.sqrt(size)
    v = (u - e1) / np.linalg.norm(u - e1)
    h = np.eye(size) - 2 * np.outer(v, v)
    np.testing.assert_allclose(h @ e1, u, atol=1e-12)
    assert householder_max(size) == pytest.approx(np.abs(h).max(), rel=1e-12)


def test_bhq_plan_is_invertible_spreads_the_outlier_and_is_block_diagonal() -> None:
    ranges = torch.tensor([1.0, 100.0, 0.9, 1.1, 0.0, 1.0, 1.2, 0.8])
    plan = householder_plan(ranges)
    n = len(ranges)
    x = torch.randn(n, 11, dtype=torch.float64)
    torch.testing.assert_close(plan.invert(plan.apply(x)), x, rtol=1e-12, atol=1e-12)
    t = plan.apply(torch.eye(n, dtype=torch.float64))  # column j = T e_j
    same_block = plan.block[:, None] == plan.block[None, :]
    assert bool((t[~same_block] == 0).all())
    big = plan.block == plan.block[1]
    assert int(big.sum()) > 2  # the outlier row heads a block with several small rows
    col = t[:, 1]  # the outlier's column is spread evenly (1/√sz·s₁) over its block
    torch.testing.assert_close(col[big], torch.full((int(big.sum()),), float(col[big][0]), dtype=torch.float64))
    assert householder_plan(torch.zeros(5)).blocks == 5  # nothing to mix
    assert householder_plan(torch.ones(1)).blocks == 1


# ---------------------------------------------------------------- config and registry


def test_registry_matches_the_torch_free_options() -> None:
    assert tuple(GRAD_METHODS) == options.GRAD_METHOD_NAMES
    assert set(options.PRUNING_METHODS) <= set(options.GRAD_METHOD_NAMES)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, r"GradQuantConfig.bits: got 0; allowed: an integer in \[1, 16\]"),
        ({"bits": 17}, "GradQuantConfig.bits: got 17"),
        ({"bits": True}, "GradQuantConfig.bits: got True"),
        ({"method": "hadamard"}, r"GradQuantConfig.method: got 'hadamard'; allowed: \['ptq', 'psq', 'bhq', 'agp'"),
        ({"method": "agp", "keep": 0.0}, r"GradQuantConfig.keep: got 0.0; allowed: a number in \(0, 1\]"),
        ({"method": "agp", "keep": 1.5}, "GradQuantConfig.keep: got 1.5"),
        ({"method": "psq", "keep": 0.5}, r"keep < 1 needs a pruning method \['agp', 'topk'\]"),
        ({"scq": "yes"}, "GradQuantConfig.scq: got 'yes'"),
        ({"seed": -1}, "GradQuantConfig.seed: got -1"),
    ],
)
def test_config_errors_name_the_field_and_the_allowed_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradQuantConfig(**kwargs)


def test_config_from_mapping() -> None:
    cfg = GradQuantConfig.from_mapping({"bits": 4, "method": "agp", "keep": 0.25, "scq": False})
    assert cfg == GradQuantConfig(4, "agp", 0.25, False, 0)
    assert GradQuantConfig.from_mapping(cfg.to_dict()) == cfg
    assert GradQuantConfig(method="topk", keep=1).keep == 1.0 and isinstance(GradQuantConfig(keep=1).keep, float)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bit'\]; allowed: \['bits', 'method'"):
        GradQuantConfig.from_mapping({"bit": 4})
