"""Tests for lightning_dbq.search.cost: MACs/BOPs, Double Rounding error matrix and sensitivity costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dbq.search.cost import (
    average_bits,
    bops_matrix,
    hawq_cost,
    layer_macs,
    paper_cost,
    quantization_error_matrix,
)


class _TinyNet(nn.Module):
    """Input (1, 3, 10, 10). Every layer's MACs are computed by hand in the test."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # -> (8, 10, 10)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # -> (8, 5, 5)
        self.pw = nn.Conv2d(8, 16, 1)  # -> (16, 5, 5)
        self.grouped = nn.Conv2d(16, 12, (3, 1), groups=4)  # -> (12, 3, 5)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)  # (12, 3, 5) -> (6, 6, 10)
        self.tokens = nn.Linear(10, 4)  # applied to (6*6, 10) tokens -> (36, 4)
        self.fc = nn.Linear(36 * 4, 5)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.pw(self.dw(torch.relu(self.bn(self.conv1(x))))))
        x = self.up(x)  # (B, 6, 6, 10)
        x = self.tokens(x.flatten(1, 2))  # (B, 36, 4)
        return self.fc(x.flatten(1))


HAND_MACS = {
    "conv1": (8 * 10 * 10) * (3 * 3 * 3),
    "dw": (8 * 5 * 5) * (1 * 3 * 3),  # depthwise: C_in/groups = 1, stride 2 halves H and W
    "pw": (16 * 5 * 5) * 8,
    "grouped": (12 * 3 * 5) * ((16 // 4) * 3 * 1),
    "up": (12 * 3 * 5) * (6 * 2 * 2),  # transposed: every input element feeds C_out/groups * kh * kw outputs
    "tokens": (36 * 4) * 10,
    "fc": 5 * (36 * 4),
}


def test_layer_macs_matches_hand_computed_counts() -> None:
    torch.manual_seed(0)
    net = _TinyNet()
    assert layer_macs(net, torch.randn(1, 3, 10, 10), list(HAND_MACS)) == HAND_MACS


def test_layer_macs_is_per_sample_and_counts_shared_layers_twice() -> None:
    torch.manual_seed(0)
    net = _TinyNet()
    assert layer_macs(net, torch.randn(3, 3, 10, 10), ["conv1", "fc"]) == {k: HAND_MACS[k] for k in ("conv1", "fc")}
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert layer_macs(twice, torch.randn(1, 4), ["0"]) == {"0": 2 * 4 * 4}


def test_layer_macs_restores_modes_removes_hooks_and_keeps_bn_stats() -> None:
    torch.manual_seed(0)
    net = _TinyNet().train()
    net.pw.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in net.named_modules()}
    stats = net.bn.running_mean.clone()
    layer_macs(net, torch.randn(1, 3, 10, 10), ["conv1", "dw"])
    assert {name: m.training for name, m in net.named_modules()} == before
    assert all(not m._forward_hooks for m in net.modules())
    assert torch.equal(net.bn.running_mean, stats)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["nope"], "layer 'nope' is not a submodule"),
        (["bn"], "layer 'bn' \\(BatchNorm2d\\) has no weight with ndim >= 2"),
        (["unused"], "were not called during the forward pass"),
        (["fc", "fc"], "duplicates"),
    ],
)
def test_layer_macs_errors(names: list[str], match: str) -> None:
    net = _TinyNet()
    with pytest.raises(ValueError, match=match):
        layer_macs(net, torch.randn(1, 3, 10, 10), names)
    assert all(not m._forward_hooks for m in net.modules())


def test_bops_matrix_against_loops() -> None:
    macs, bits, act = [10, 2000, 7], [8, 6, 4, 2], [8, 8, 4, 4]
    same = bops_matrix(macs, bits)
    mixed = bops_matrix(macs, bits, act_bits=act)
    assert same.shape == mixed.shape == (3, 4)
    for i, m in enumerate(macs):
        for j, b in enumerate(bits):
            assert same[i, j] == m * b * b
            assert mixed[i, j] == m * b * act[j]
    with pytest.raises(ValueError, match="act_bits has 2 entries but bits has 4"):
        bops_matrix(macs, bits, act_bits=[8, 4])
    with pytest.raises(ValueError, match="macs must be"):
        bops_matrix([-1], bits)
    with pytest.raises(ValueError, match="bits=.* must contain positive integers"):
        bops_matrix(macs, [8, 0])


def _np_double_round(w: np.ndarray, s: np.ndarray, h: int, bits: int) -> np.ndarray:
    """Independent NumPy Double Rounding: rhu = floor(x + 0.5), signed clamps, k = h - l (all in float32)."""
    w, s = w.astype(np.float32), s.astype(np.float32)
    half = np.float32(0.5)
    q_h = np.clip(np.floor(w / s + half), -(2 ** (h - 1)), 2 ** (h - 1) - 1)
    k = h - bits
    q_l = np.clip(np.floor(q_h / np.float32(2**k) + half), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q_l * np.float32(2**k) * s).astype(np.float32)


@pytest.mark.parametrize(("high_bits", "bits"), [(8, (8, 6, 4, 2)), (4, (4, 3, 2))])
def test_quantization_error_matrix_matches_numpy_double_rounding(high_bits: int, bits: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    s_tensor = torch.tensor(2.0**-6)  # a power of two: (i + 0.5)·s / s is exactly i + 0.5
    # exact half-way points on the h-bit grid (where half-up and half-to-even differ), plus clipped outliers
    ties = (torch.arange(-9, 60, dtype=torch.float32) + 0.5) * s_tensor  # asymmetric: no cancellation
    weights = [
        torch.randn(16, 8, 3, 3, generator=gen) * 0.05,
        torch.cat([ties, torch.tensor([5.0, -5.0])]),
        torch.randn(10, 7, generator=gen) * 0.3,
    ]
    scales = [torch.tensor(0.004), s_tensor, torch.rand(10, 1, generator=gen) * 0.05 + 0.01]  # last: per-channel
    got = quantization_error_matrix(weights, scales, high_bits, bits)
    assert got.shape == (3, len(bits))
    for i, (w, s) in enumerate(zip(weights, scales, strict=True)):
        for j, b in enumerate(bits):
            w_np = w.numpy().astype(np.float64)
            ref = np.sum((_np_double_round(w.numpy(), s.numpy(), high_bits, b).astype(np.float64) - w_np) ** 2)
            assert got[i, j] == pytest.approx(ref, rel=1e-10, abs=0)
    # lower precision never gives a smaller error on Gaussian weights (sanity, not the oracle)
    assert np.all(np.diff(got[0]) >= 0)


def test_quantization_error_matrix_errors() -> None:
    w, s = [torch.randn(4)], [torch.tensor(0.1)]
    with pytest.raises(ValueError, match=r"bits=\[8, 9\] invalid: every bit must be in \[2, high_bits=8\]"):
        quantization_error_matrix(w, s, 8, [8, 9])
    with pytest.raises(ValueError, match="same length"):
        quantization_error_matrix(w, s + s, 8, [8])
    with pytest.raises(ValueError, match=r"scales\[0\] must be positive"):
        quantization_error_matrix(w, [torch.tensor(-0.1)], 8, [8])
    with pytest.raises(ValueError, match="high_bits=9 must be in"):
        quantization_error_matrix(w, s, 9, [8])


def test_hawq_cost_clamps_negative_traces() -> None:
    rng = np.random.default_rng(0)
    traces = [-0.5, 0.0, 2.0, 1e-3]
    errors = rng.random((4, 3))
    got = hawq_cost(traces, errors)
    for i, t in enumerate(traces):
        for j in range(3):
            assert got[i, j] == max(t, 0.0) * errors[i, j]
    assert np.all(got[0] == 0)
    with pytest.raises(ValueError, match="traces has 3 entries but errors has 4 rows"):
        hawq_cost(traces[:3], errors)
    with pytest.raises(ValueError, match="traces must be finite"):
        hawq_cost([np.nan, 1, 1, 1], errors)
    with pytest.raises(ValueError, match="errors must be a 2-D"):
        hawq_cost(traces, errors[0])


def test_paper_cost_is_trace_over_bits() -> None:
    traces, bits = [3.0, -1.0, 0.25], [8, 4, 2]
    got = paper_cost(traces, bits)
    for i, t in enumerate(traces):
        for j, b in enumerate(bits):
            assert got[i, j] == pytest.approx(max(t, 0.0) / b, rel=1e-15, abs=0)
    assert np.all(np.argmin(got[[0, 2]], axis=1) == 0)  # minimized: more bits for a positive trace


def test_average_bits() -> None:
    params = {"a": 100, "b": 300, "c": 600, "fp_head": 10}
    config = {"a": 8, "b": 4, "c": 2}
    expected = (100 * 8 + 300 * 4 + 600 * 2) / (100 + 300 + 600)
    assert average_bits(config, params) == pytest.approx(expected, rel=1e-15, abs=0)
    with pytest.raises(ValueError, match=r"params has no entry for layers \['d'\]"):
        average_bits({**config, "d": 4}, params)
    with pytest.raises(ValueError, match="config is empty"):
        average_bits({}, params)
