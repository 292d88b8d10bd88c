"""TimmSyncBatchNorm: a LayerSync plugin that keeps timm's BatchNormAct2d activation under SyncBatchNorm.

Lightning's ``sync_batchnorm=True`` uses ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which silently drops
the activation of timm's ``BatchNormAct2d`` (docs/design.md §2.8). Use
``Trainer(strategy="dbq_ddp", plugins=[TimmSyncBatchNorm()])`` instead: timm's converter gives ``SyncBatchNormAct``
with ``act``/``drop`` kept, and it reaches the per-bit norm copies inside ``PerBitNorm`` / ``TransitionalNorm``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from typing_extensions import override

__all__ = ["TimmSyncBatchNorm"]


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """SyncBatchNorm conversion through ``timm.layers.convert_sync_batchnorm`` (and back)."""

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every BatchNorm (timm BatchNormAct2d → SyncBatchNormAct, others → SyncBatchNorm)."""
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)  # type: ignore[no-any-return]

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        """Convert back; ``SyncBatchNormAct`` becomes ``BatchNormAct2d`` with its activation and drop."""
        from timm.layers import BatchNormAct2d, SyncBatchNormAct

        if isinstance(model, SyncBatchNormAct):
            out: Any = BatchNormAct2d(model.num_features, model.eps, affine=model.affine,
                                      track_running_stats=model.track_running_stats)  # fmt: skip
            out.momentum = model.momentum
            out.act, out.drop = model.act, model.drop
            if model.affine:
                with torch.no_grad():
                    out.weight, out.bias = model.weight, model.bias
            out.running_mean, out.running_var = model.running_mean, model.running_var
            out.num_batches_tracked = model.num_batches_tracked
            for name, child in model.named_children():
                if name not in ("act", "drop"):
                    out.add_module(name, self.revert(child))
            return out
        if isinstance(model, nn.SyncBatchNorm):
            return super().revert(model)
        for name, child in list(model.named_children()):
            model.add_module(name, self.revert(child))
        return model
