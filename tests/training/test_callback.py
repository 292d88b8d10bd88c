"""The drop-in callback on a plain LightningModule under the default strategy."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.training import DBQModule, DoubleRoundingQAT
from tests.helpers.tiny import PlainClassifier, TinyNet


def _fit(module: pl.LightningModule, cb: DoubleRoundingQAT, tmp_path: Path, **kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=kw.pop("max_epochs", 3), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[cb], **kw)  # fmt: skip
    trainer.fit(module, SyntheticDataModule(num_samples=128, num_classes=4, image_size=8, batch_size=16))
    return trainer


def test_dropin_trains_every_bit_and_logs_per_bit_metrics(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = PlainClassifier()
    trainer = _fit(module, DoubleRoundingQAT(bits=[8, 4, 2], num_classes=4), tmp_path)
    assert dbq.bit_config(module.net) and set(dbq.bit_config(module.net).values()) == {8}
    assert module.backward_calls == trainer.global_step * 3
    m = trainer.callback_metrics
    for label in ("w8a8", "w4a4", "w2a2"):
        assert m[f"val/acc_{label}"] > 0.5, label  # chance 0.25: learned at every bit
    assert "val/acc_min" in m and "val/acc_mean" in m
    # idempotent: fitting again (setup runs again) does not re-prepare or re-wrap
    n_params = sum(p.numel() for p in module.parameters())
    _fit(module, DoubleRoundingQAT(bits=[8, 4, 2], num_classes=4), tmp_path, max_epochs=1)
    assert sum(p.numel() for p in module.parameters()) == n_params


def test_dropin_refuses_dbqmodule_and_mismatched_bits(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="DBQModule already trains every bit"):
        _fit(DBQModule(TinyNet(), num_classes=4, bits=[8, 2]), DoubleRoundingQAT(bits=[8, 2]), tmp_path)
    module = PlainClassifier()
    dbq.prepare(module.net, bits=[8, 2])
    with pytest.raises(ValueError, match="already prepared"):
        _fit(module, DoubleRoundingQAT(bits=[8, 4, 2], num_classes=4), tmp_path)
