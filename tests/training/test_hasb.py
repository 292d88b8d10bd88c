"""HASB SuperNet training: per-layer configs per pass, switch rate ≈ σ, identical draws after a resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.training import DBQModule
from lightning_dbq.training.callbacks.hasb import HASB
from lightning_dbq.training.callbacks.hessian import HessianTraces
from tests.helpers.tiny import TinyNet


class _Configs(Callback):
    """Record (global_step, config) of every optimizer step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, int]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rows.append((trainer.global_step, dict(dbq.bit_config(pl_module.model))))


class _Interrupt(Callback):
    def __init__(self, after: int, path: Path) -> None:
        self.after, self.path = after, path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.after:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _fit(callbacks: list, tmp_path: Path, epochs: int = 3, ckpt: Path | None = None) -> DBQModule:
    pl.seed_everything(0)
    module = DBQModule(TinyNet(width=8), num_classes=4, bits=[8, 4, 2], quant={"transitional_norm": True}, lr=5e-3)
    trainer = pl.Trainer(accelerator="cpu", strategy="dbq", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=callbacks)  # fmt: skip
    trainer.fit(
        module, SyntheticDataModule(num_samples=160, num_classes=4, image_size=8, batch_size=16), ckpt_path=ckpt
    )
    return module


def test_hasb_switches_layers_at_rate_sigma_and_resumes_identically(tmp_path: Path, report) -> None:
    hessian = HessianTraces(output_dir=str(tmp_path), num_images=64, batch_size=32, max_samples=8)
    full = _Configs()
    _fit([hessian, HASB(sigma0=1.0, seed=3), full], tmp_path)
    assert (tmp_path / "traces.json").is_file() and (tmp_path / "traces.png").is_file()
    # 3 passes per batch (8, 4, 2); in pass i each layer keeps bits[i] unless it switched
    assert len(full.rows) == 3 * 8 * 3
    epochs = [full.rows[i * 24 : (i + 1) * 24] for i in range(3)]
    rates = []
    for e, rows in enumerate(epochs):
        sigma = 1.0 * (e + 1) / 3
        kept = sum(1 for k, (_, cfg) in enumerate(rows) for b in cfg.values() if b == (8, 4, 2)[k % 3])
        total = sum(len(cfg) for _, cfg in rows)
        # a switching layer re-draws and may land on the same bit: P(keep) = 1 - σ + σ·p(bits)
        rates.append(1 - kept / total)
        assert 0.0 <= 1 - kept / total <= sigma + 0.15
    assert rates[0] < rates[2]  # σ_e ramps up
    report(f"HASB switch rates per epoch (σ_e = 1/3, 2/3, 1): {[round(r, 3) for r in rates]}")
    # resume after epoch 0 draws exactly the same configurations for the remaining steps
    ckpt = tmp_path / "int.ckpt"
    _fit([HessianTraces(num_images=64, batch_size=32, max_samples=8), HASB(sigma0=1.0, seed=3), _Interrupt(0, ckpt)],
         tmp_path)  # fmt: skip
    resumed = _Configs()
    _fit([HessianTraces(num_images=64, batch_size=32, max_samples=8), HASB(sigma0=1.0, seed=3), resumed], tmp_path,
         ckpt=ckpt)  # fmt: skip
    assert resumed.rows == full.rows[24:]


def test_uniform_baseline_needs_no_traces_and_hasb_without_traces_fails(tmp_path: Path) -> None:
    rec = _Configs()
    _fit([HASB(sigma0=0.5, uniform=True), rec], tmp_path, epochs=1)
    assert len(rec.rows) == 24
    with pytest.raises(RuntimeError, match="HASB needs per-layer traces"):
        _fit([HASB(sigma0=0.5)], tmp_path, epochs=1)


def test_invalid_hasb_arguments() -> None:
    with pytest.raises(ValueError, match=r"sigma0 must be in \[0, 1\]"):
        HASB(sigma0=1.5)
    with pytest.raises(ValueError, match="compute_at must be"):
        HessianTraces(compute_at="later")
