"""Double Rounding / LSQ math against independent references (integer shifts, NumPy, finite differences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_dbq.quant.functional import (
    double_round_codes,
    double_round_fake,
    grad_scale,
    lsq_fake,
    qrange,
    round_half_up,
    shift_codes,
)


def np_shift(q: np.ndarray, high: int, low: int) -> np.ndarray:
    """Deployment path in plain NumPy integers: (q + 2^(k-1)) >> k, then clamp to the low-bit range."""
    k = high - low
    q = q.astype(np.int64)
    if k:
        q = (q + (1 << (k - 1))) >> k
    return np.clip(q, -(1 << (low - 1)), (1 << (low - 1)) - 1)


def np_double_round(w: np.ndarray, s: np.ndarray, high: int, low: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of DESIGN.md section 2 (float32 arithmetic like the torch path)."""
    w = w.astype(np.float32)
    s = np.asarray(s, dtype=np.float32)
    k = high - low
    q_h = np.clip(np.floor(w / s + np.float32(0.5)), -(1 << (high - 1)), (1 << (high - 1)) - 1)
    q_l = np.clip(np.floor(q_h / np.float32(1 << k) + np.float32(0.5)), -(1 << (low - 1)), (1 << (low - 1)) - 1)
    return (q_l * np.float32(1 << k) * s).astype(np.float32), q_h, q_l


@pytest.mark.parametrize(("high", "lows"), [(8, range(7, 1, -1)), (4, range(3, 1, -1))])
def test_exhaustive_float_path_equals_integer_shift(high: int, lows: range) -> None:
    q_all = np.arange(-(1 << (high - 1)), 1 << (high - 1))
    assert q_all.size == 1 << high
    scale = torch.tensor(0.0123)
    rng = np.random.default_rng(0)
    for low in lows:
        expect = np_shift(q_all, high, low)
        k = high - low
        # exactly on the h-bit grid, and with sub-LSB offsets that must round back to the same h-bit code
        for offset in (np.zeros(q_all.size), rng.uniform(-0.4, 0.4, q_all.size)):
            w = torch.tensor((q_all + offset) * scale.item(), dtype=torch.float32)
            fake = double_round_fake(w, scale, high, low)
            assert torch.equal(fake, torch.tensor(expect, dtype=torch.float32) * (float(1 << k) * scale))
            q_h, q_l = double_round_codes(w, scale, high, low)
            assert np.array_equal(q_h.numpy(), q_all)
            assert np.array_equal(q_l.numpy(), expect)
        assert np.array_equal(shift_codes(torch.tensor(q_all), high, low).numpy(), expect)


def test_round_half_up_is_not_half_to_even() -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert round_half_up(x).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    assert torch.round(x).tolist() != round_half_up(x).tolist()


weights = st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=32), min_size=1, max_size=64)
scales = st.floats(0.0009765625, 0.5, allow_nan=False, width=32)
bit_pairs = st.sampled_from([(8, l) for l in range(2, 9)] + [(4, l) for l in range(2, 5)] + [(6, 3)])


@given(weights, scales, bit_pairs)
def test_matches_numpy_reference(w: list[float], s: float, bits: tuple[int, int]) -> None:
    high, low = bits
    wt, st_ = torch.tensor(w), torch.tensor(s)
    ref, q_h, q_l = np_double_round(np.array(w), np.float32(s), high, low)
    assert np.array_equal(double_round_fake(wt, st_, high, low).numpy(), ref)
    c_h, c_l = double_round_codes(wt, st_, high, low)
    assert np.array_equal(c_h.numpy(), q_h) and np.array_equal(c_l.numpy(), q_l)


@given(weights, scales, bit_pairs)
def test_requantizing_is_idempotent_and_nested(w: list[float], s: float, bits: tuple[int, int]) -> None:
    high, low = bits
    k = high - low
    wt, st_ = torch.tensor(w), torch.tensor(s)
    w_hat = double_round_fake(wt, st_, high, low)
    _, q_l = double_round_codes(wt, st_, high, low)
    q_h_again, q_l_again = double_round_codes(w_hat, st_, high, low)
    assert torch.equal(q_l_again, q_l)  # re-quantizing returns the same low-bit codes
    assert torch.equal(q_h_again, q_l * (1 << k))  # the h-bit code of Ŵ_l is q_l · 2^k (nesting)
    assert torch.equal(double_round_fake(w_hat, st_, high, low), w_hat)


@given(st.integers(0, 2**31 - 1), bit_pairs)
def test_at_most_2_pow_l_distinct_values(seed: int, bits: tuple[int, int]) -> None:
    high, low = bits
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4096, generator=g) * 0.2
    s = torch.tensor(0.2 / 2 ** (high - 2))
    assert double_round_fake(w, s, high, low).unique().numel() <= 2**low


@given(weights, scales, st.sampled_from([2, 4, 6, 8]), st.floats(0.01, 1.0))
def test_l_equals_h_is_plain_lsq(w: list[float], s: float, bits: int, g: float) -> None:
    w1, s1 = torch.tensor(w, requires_grad=True), torch.tensor(s, requires_grad=True)
    w2, s2 = torch.tensor(w, requires_grad=True), torch.tensor(s, requires_grad=True)
    up = torch.linspace(-1, 1, len(w))
    out1, out2 = double_round_fake(w1, s1, bits, bits, g), lsq_fake(w2, s2, bits, signed=True, g=g)
    assert torch.equal(out1, out2)
    (out1 * up).sum().backward()
    (out2 * up).sum().backward()
    assert torch.equal(w1.grad, w2.grad) and torch.equal(s1.grad, s2.grad)


def _surrogate(w: np.ndarray, s: float, s0: float, high: int, low: int) -> np.ndarray:
    """STE surrogate: the rounding offset frozen at s0, clip kept: s·(clamp(W/s, lo, hi) + δ0)."""
    k = high - low
    lo, hi = -(1 << (low - 1)) * (1 << k), ((1 << (low - 1)) - 1) * (1 << k)
    _, _, q_l0 = np_double_round(w, np.float32(s0), high, low)
    delta0 = q_l0.astype(np.float64) * (1 << k) - np.clip(w / s0, lo, hi)
    return s * (np.clip(w / s, lo, hi) + delta0)


@given(st.integers(0, 2**31 - 1), bit_pairs)
def test_gradients_equal_ste_formula_and_finite_differences(seed: int, bits: tuple[int, int]) -> None:
    high, low = bits
    k = high - low
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, 64).astype(np.float32)
    s0 = float(np.float32(rng.uniform(0.5, 3.0) / 2 ** (high - 1) * 2**k))  # some weights clip, some do not
    up = rng.normal(0, 1, 64)
    wt, st_ = torch.tensor(w, requires_grad=True), torch.tensor(s0, requires_grad=True)
    (double_round_fake(wt, st_, high, low) * torch.tensor(up, dtype=torch.float32)).sum().backward()
    # closed-form STE gradients (DESIGN.md 2 / algos.md E.2)
    v = w.astype(np.float64) / s0
    lo, hi = -(1 << (low - 1)) * (1 << k), ((1 << (low - 1)) - 1) * (1 << k)
    _, _, q_l = np_double_round(w, np.float32(s0), high, low)
    ds = np.where(v <= lo, lo, np.where(v >= hi, hi, q_l * (1 << k) - v))
    inside = (v > lo) & (v < hi)
    np.testing.assert_allclose(st_.grad.item(), (ds * up).sum(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(wt.grad.numpy()[inside], up[inside], rtol=1e-6)
    assert np.all(wt.grad.numpy()[(v < lo) | (v > hi)] == 0)
    # central finite differences of the surrogate in float64
    eps = s0 * 1e-6
    w64 = w.astype(np.float64)
    fd = (_surrogate(w64, s0 + eps, s0, high, low) - _surrogate(w64, s0 - eps, s0, high, low)) * up
    np.testing.assert_allclose(st_.grad.item(), fd.sum() / (2 * eps), rtol=1e-3, atol=1e-3)


def test_grad_scale_multiplies_gradient_and_keeps_value_bit_exact() -> None:
    s = torch.tensor(0.0371, requires_grad=True)
    out = grad_scale(s, 0.013)
    assert torch.equal(out, s)
    out.backward()
    assert s.grad.item() == pytest.approx(0.013)
    w, s1, s2 = torch.randn(100), torch.tensor(0.05, requires_grad=True), torch.tensor(0.05, requires_grad=True)
    double_round_fake(w, s1, 8, 4, g=0.25).sum().backward()
    double_round_fake(w, s2, 8, 4, g=1.0).sum().backward()
    assert s1.grad.item() == pytest.approx(0.25 * s2.grad.item(), rel=1e-6)


def test_fp32_arithmetic_under_autocast() -> None:
    w, s = torch.randn(256) * 0.1, torch.tensor(0.1 / 64)
    ref = double_round_fake(w, s, 8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = double_round_fake(w, s, 8, 6)
        out_bf16 = double_round_fake(w.bfloat16(), s, 8, 6)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert out_bf16.dtype == torch.bfloat16
    assert torch.equal(out_bf16.float(), double_round_fake(w.bfloat16().float(), s, 8, 6).bfloat16().float())


def test_qrange_and_lsq_unsigned() -> None:
    assert qrange(8, True) == (-128, 127) and qrange(3, False) == (0, 7)
    x = torch.tensor([-1.0, 0.0, 0.26, 10.0])
    assert lsq_fake(x, torch.tensor(0.5), 2, signed=False).tolist() == [0.0, 0.0, 0.5, 1.5]


@pytest.mark.parametrize(("high", "low"), [(8, 9), (8, 1), (4, 6), (9, 4)])
def test_bad_bits_raise(high: int, low: int) -> None:
    with pytest.raises(ValueError, match="bits must satisfy"):
        double_round_fake(torch.zeros(3), torch.tensor(1.0), high, low)
