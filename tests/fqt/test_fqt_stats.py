"""record_grad_stats: kept fraction and average bits of the quantized backward, against the configured values."""

from __future__ import annotations

import pytest
import torch

from lightning_dbq.fqt import GradQuantConfig, fqt_conv, fqt_linear, record_grad_stats


def _conv_backward(config: GradQuantConfig, gy: torch.Tensor, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(gy.shape[0], 3, 8, 8, requires_grad=True)
    w = torch.randn(gy.shape[1], 3, 3, 3, requires_grad=True)
    fqt_conv(x, w, None, config, gen, 1, 1).backward(gy)


def _heterogeneous(n: int, c: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    scale = torch.exp(1.5 * torch.randn(n, 1, 1, 1, generator=gen))
    return torch.randn(n, c, 8, 8, generator=gen) * scale


@pytest.mark.parametrize("method", ["ptq", "psq", "bhq"])
def test_methods_without_pruning_keep_every_group_at_their_bits(method: str) -> None:
    gy = _heterogeneous(16, 8)
    gy[3] = 0  # an all-zero sample is not a group that could be kept
    with record_grad_stats() as stats:
        _conv_backward(GradQuantConfig(bits=3, method=method), gy)
    assert stats.groups == {"x": 15, "w": 8}
    assert stats.kept_fraction() == 1.0
    assert stats.average_bits() == 3.0


@pytest.mark.parametrize("method", ["agp", "topk"])
def test_pruning_keeps_about_keep_and_averages_bits_times_keep(method: str) -> None:
    gy = _heterogeneous(64, 64)
    with record_grad_stats() as stats:
        for seed in range(10):
            _conv_backward(GradQuantConfig(bits=4, method=method, keep=0.25), gy, seed)
    assert stats.groups == {"x": 640, "w": 640}
    assert stats.kept_fraction("x") == pytest.approx(0.25, abs=0.04)
    assert stats.kept_fraction("w") == pytest.approx(0.25, abs=0.04)
    assert stats.average_bits() == pytest.approx(4 * stats.kept_fraction(), rel=1e-12)
    assert stats.average_bits() == pytest.approx(1.0, abs=0.16)


def test_linear_paths_and_nothing_recorded_outside_the_block() -> None:
    config = GradQuantConfig(bits=2, method="agp", keep=0.5, scq=True)
    x = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(12, 16, requires_grad=True)
    with record_grad_stats() as stats:
        fqt_linear(x, w, None, config, torch.Generator().manual_seed(0)).sum().backward()
    assert stats.groups == {"x": 32, "w": 12}
    snapshot = stats.as_dict()
    fqt_linear(x, w, None, config, torch.Generator().manual_seed(1)).sum().backward()
    assert stats.as_dict() == snapshot
    for path in ("x", "w"):  # groups of one path have equal size: bits x kept fraction
        assert 0 < snapshot[f"kept_fraction_{path}"] < 1
        assert snapshot[f"average_bits_{path}"] == pytest.approx(2 * snapshot[f"kept_fraction_{path}"])
