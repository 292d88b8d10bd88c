"""Baseline weight modes: floor nesting (AdaBits-style) and unshared per-bit scales ("Ours*")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_dbq as dbq
from lightning_dbq.quant.functional import floor_nest_fake, lsq_fake
from lightning_dbq.quant.quantizers import WeightQuantizer
from tests.helpers.tiny import TinyNet


@pytest.mark.parametrize(("high", "low"), [(8, 6), (8, 4), (8, 2), (4, 2)])
def test_floor_nesting_equals_arithmetic_shift(high: int, low: int) -> None:
    q = np.arange(-(1 << (high - 1)), 1 << (high - 1))
    s = torch.tensor(0.031)
    w = torch.tensor(q * s.item(), dtype=torch.float32)
    k = high - low
    expect = (q >> k).astype(np.float32) * (1 << k)  # NumPy arithmetic shift = floor division
    assert torch.equal(floor_nest_fake(w, s, high, low), torch.tensor(expect) * s)
    assert np.all(q >> k >= -(1 << (low - 1)))
    assert np.all(q >> k <= (1 << (low - 1)) - 1)


def test_floor_nesting_is_biased_down_and_double_rounding_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20000, generator=g) * 0.1
    q = WeightQuantizer(w, [8, 2])
    s = q.effective_scale().detach()
    from lightning_dbq.quant.functional import double_round_fake

    floor_err = (floor_nest_fake(w, s, 8, 4) - w).mean().item()
    dr_err = (double_round_fake(w, s, 8, 4) - w).mean().item()
    step = 16 * s.item()
    assert floor_err < -0.3 * step  # truncation: about half a 4-bit step below
    assert abs(dr_err) < 0.05 * step


def test_unshared_mode_is_per_bit_lsq() -> None:
    w = torch.randn(32, 16) * 0.05
    q = WeightQuantizer(w, [8, 4, 2], mode="unshared")
    assert set(q.scales) == {"8", "4", "2"}
    for b in (8, 4, 2):
        q.active_bits = b
        s = q.scales[str(b)]
        assert s.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(2 ** (b - 1) - 1), rel=1e-5)
        assert torch.equal(q(w), lsq_fake(w, s.abs() + 1e-8, b, signed=True))
    with pytest.raises(ValueError, match="no shared integer codes"):
        q.codes(w)


@pytest.mark.parametrize("mode", ["floor", "unshared"])
def test_baseline_models_round_trip_through_the_artifact(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = dbq.prepare(TinyNet(), bits=[8, 4, 2], weight_mode=mode)
    x = torch.randn(6, 3, 8, 8)
    model(x)
    model.eval()
    loaded = dbq.load_int(dbq.save_int(model, tmp_path / f"{mode}.dbq.safetensors"), model=TinyNet())
    with torch.no_grad():
        for b in (8, 4, 2):
            dbq.set_bits(model, b)
            dbq.set_bits(loaded, b)
            assert torch.equal(model(x), loaded(x))


def test_unknown_weight_mode() -> None:
    with pytest.raises(ValueError, match="`weight_mode` must be one of"):
        dbq.prepare(TinyNet(), bits=[8, 4], weight_mode="ceil")
