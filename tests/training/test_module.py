"""DBQModule on tiny data: learning at every bit, metric names, checkpoints, resume equality."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.training import DBQModule
from tests.helpers.tiny import TinyNet


def _dm() -> SyntheticDataModule:
    return SyntheticDataModule(num_samples=192, num_classes=4, image_size=8, batch_size=16, noise=0.5, seed=0)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, strategy="dbq", max_epochs=4, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, deterministic=True)  # fmt: skip
    base.update(kw)
    return pl.Trainer(**base)


def test_learns_at_every_bit_and_logs_per_bit_metrics(tmp_path: Path, report) -> None:
    pl.seed_everything(0)
    module = DBQModule(TinyNet(width=16), num_classes=4, bits=[8, 4, 2], lr=1e-2)
    trainer = _trainer(tmp_path, enable_checkpointing=False, max_epochs=6)
    trainer.fit(module, _dm())
    m = trainer.callback_metrics
    assert {"val/acc_w8a8", "val/acc_w4a4", "val/acc_w2a2", "val/acc_min", "val/acc_mean"} <= set(m)
    for label in ("w8a8", "w4a4", "w2a2"):
        assert m[f"val/acc_{label}"] > 0.6, (label, float(m[f"val/acc_{label}"]))  # chance is 0.25
    assert m["val/acc_min"] == min(m[f"val/acc_{x}"] for x in ("w8a8", "w4a4", "w2a2"))
    report("DBQModule on synthetic 4-class data (6 epochs): " + ", ".join(
        f"{k}={float(v):.3f}" for k, v in m.items() if k.startswith("val/acc_w")))  # fmt: skip
    results = trainer.test(module, _dm(), verbose=False)[0]
    assert {"test/acc_w8a8", "test/acc_w4a4", "test/acc_w2a2"} <= set(results)


def test_checkpoint_is_plain_and_reloads(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = DBQModule("cifar_resnet20", num_classes=4, in_chans=3, bits=[8, 2], quant={"per_channel": True})
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, callbacks=[ckpt_cb])
    trainer.fit(module, _dm())
    path = ckpt_cb.last_model_path
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no OmegaConf / pickled objects inside
    assert ckpt["hyper_parameters"]["bits"] == (8, 2) or list(ckpt["hyper_parameters"]["bits"]) == [8, 2]
    loaded = DBQModule.load_from_checkpoint(path)
    assert dbq.quantized_layers(loaded.model)
    assert loaded.model.get_submodule("layer1.0.conv1").weight_quant.per_channel
    x = torch.randn(3, 3, 8, 8)
    module.eval()
    loaded.eval()
    for b in (8, 2):
        dbq.set_bits(module.model, b)
        dbq.set_bits(loaded.model, b)
        assert torch.equal(module(x), loaded(x))
    res = _trainer(tmp_path).test(DBQModule("cifar_resnet20", num_classes=4, bits=[8, 2], quant={"per_channel": True}),
                                  _dm(), ckpt_path=path, verbose=False)[0]  # fmt: skip
    assert set(res) >= {"test/acc_w8a8", "test/acc_w2a2"}


class _Interrupt(Callback):
    """Save a checkpoint at the end of epoch ``after`` and stop, as if the job had been killed there."""

    def __init__(self, after: int, path: Path) -> None:
        self.after, self.path = after, path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.after:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    def run(callbacks: list, ckpt_path: Path | None = None) -> tuple[DBQModule, pl.Trainer]:
        pl.seed_everything(0)
        module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], lr=5e-3)
        trainer = _trainer(tmp_path, max_epochs=3, callbacks=callbacks, enable_checkpointing=False)
        trainer.fit(module, _dm(), ckpt_path=ckpt_path)
        return module, trainer

    full, full_tr = run([])
    ckpt = tmp_path / "interrupted.ckpt"
    _, part_tr = run([_Interrupt(0, ckpt)])
    assert part_tr.current_epoch == 1 and ckpt.exists()
    resumed, resumed_tr = run([], ckpt_path=ckpt)
    assert resumed_tr.global_step == full_tr.global_step
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    for k in ("val/acc_w8a8", "val/acc_w2a2"):
        assert float(full_tr.callback_metrics[k]) == float(resumed_tr.callback_metrics[k])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model name 'resnet_does_not_exist'"):
        DBQModule("resnet_does_not_exist", num_classes=4)
    with pytest.raises(ValueError, match="model has num_classes=4 but num_classes=10 was given"):
        DBQModule(TinyNet(num_classes=4), num_classes=10)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DBQModule(TinyNet(), num_classes=4, optimizer="lion")


def test_init_from_multi_precision_checkpoint_into_transitional_norms(tmp_path: Path) -> None:
    pl.seed_everything(0)
    multi = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2])
    multi.model(torch.randn(8, 3, 8, 8))  # initialise activation scales
    path = tmp_path / "multi.ckpt"
    torch.save({"state_dict": multi.state_dict()}, path)
    mixed = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], quant={"transitional_norm": True},
                      init_checkpoint=str(path))  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    multi.eval()
    mixed.eval()
    for b in (8, 4, 2):  # uniform configs: transitional (b, b) norms equal the per-bit ones
        dbq.set_bits(multi.model, b)
        dbq.set_bits(mixed.model, b)
        assert torch.equal(multi(x), mixed(x))
    fp = tmp_path / "fp.pt"
    torch.save(TinyNet(num_classes=5).state_dict(), fp)
    with pytest.raises(ValueError, match="does not match the model"):
        DBQModule(TinyNet(), num_classes=4, init_checkpoint=str(fp))


def test_report_history_matches_each_epochs_metrics(tmp_path: Path) -> None:
    from lightning_dbq.training import DBQReport

    pl.seed_everything(0)
    report_cb = DBQReport(str(tmp_path / "out"))
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 2], lr=5e-3)
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[report_cb], enable_checkpointing=False)
    trainer.fit(module, _dm())
    assert [h["epoch"] for h in report_cb.history] == [1.0, 2.0]
    assert report_cb.history[-1]["w2a2"] == float(trainer.callback_metrics["val/acc_w2a2"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["val"]["w8a8"]["acc"] == report_cb.history[-1]["w8a8"]
