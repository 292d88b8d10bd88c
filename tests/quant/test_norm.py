"""PerBitNorm / TransitionalNorm selection, diagonal initialisation, and artifact round trip with transitional norms."""

from __future__ import annotations

from pathlib import Path

import torch

import lightning_dbq as dbq
from lightning_dbq.quant.norm import PerBitNorm, TransitionalNorm
from tests.helpers.tiny import TinyNet


def _model(transitional: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return dbq.prepare(TinyNet(), bits=[8, 4, 2], transitional_norm=transitional)


def test_transitional_norm_keys_follow_previous_and_own_layer_bits() -> None:
    model = _model(True)
    bn2, bn3 = model.bn2, model.bn3
    assert isinstance(bn2, TransitionalNorm) and isinstance(bn3, TransitionalNorm)
    assert (bn2.owner, bn2.prev, bn3.owner, bn3.prev) == ("conv2", "", "conv3", "conv2")
    assert len(bn3.norms) == 9  # 3 × 3 (prev bits, bits) pairs
    dbq.set_bits(model, {"conv2": 2, "conv3": 8})
    assert bn3.active == (2, 8) and bn2.active == (2, 2)
    dbq.set_bits(model, 4)
    assert bn3.active == (4, 4) and bn2.active == (4, 4)  # uniform configs use the diagonal


def test_diagonal_copy_and_uniform_equivalence_with_per_bit_norm() -> None:
    per_bit, trans = _model(False), _model(True)
    x = torch.randn(16, 3, 8, 8)
    for m in (per_bit, trans):
        m.train()
        for b in (8, 4, 2):
            dbq.set_bits(m, b)
            m(x)  # initialises activation scales and updates only the active (diagonal) norm's statistics
        m.eval()
    with torch.no_grad():
        trans.bn3.norms["8_2"].running_mean.fill_(123.0)
        trans.bn3.copy_diagonal_to_all()
        assert torch.equal(trans.bn3.norms["8_2"].running_mean, trans.bn3.norms["2_2"].running_mean)
        for b in (8, 4, 2):
            dbq.set_bits(per_bit, b)
            dbq.set_bits(trans, b)
            assert torch.equal(per_bit(x), trans(x))
    assert isinstance(per_bit.bn3, PerBitNorm)


def test_artifact_round_trip_with_transitional_norms(tmp_path: Path) -> None:
    model = _model(True)
    model.train()
    model(torch.randn(8, 3, 8, 8))
    model.eval()
    path = dbq.save_int(model, tmp_path / "t.dbq.safetensors")
    loaded = dbq.load_int(path, model=TinyNet())
    cfg = {"conv2": 2, "conv3": 8}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        dbq.set_bits(model, cfg)
        dbq.set_bits(loaded, cfg)
        assert torch.equal(model(x), loaded(x))
