"""The FP32 arm: a plain LightningModule on the same data and recipe, whose weights initialise every quantized arm."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_dbq.quant.factory import create_fp_model

__all__ = ["FPClassifier"]


class FPClassifier(pl.LightningModule):
    """Full-precision training with the quantized arms' optimizer defaults (Adam, cosine per step)."""

    def __init__(self, model: str, num_classes: int, lr: float = 5e-4, weight_decay: float = 5e-5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_fp_model(model, num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc_fp32", self.val_acc.compute())
        self.val_acc.reset()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
