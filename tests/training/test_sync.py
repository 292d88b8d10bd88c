"""TimmSyncBatchNorm keeps BatchNormAct2d's activation (Lightning's default converter drops it)."""

from __future__ import annotations

import timm
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct

import lightning_dbq as dbq
from lightning_dbq.training.sync import TimmSyncBatchNorm


def test_conversion_keeps_activation_and_outputs() -> None:
    torch.manual_seed(0)
    model = dbq.prepare(timm.create_model("mobilenetv2_100", num_classes=10), bits=[8, 4])
    x = torch.randn(2, 3, 32, 32)
    model(x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(model).eval()  # converted modules are created in train mode
    inner = synced.get_submodule("blocks.1.0.bn1.norms.4")
    assert isinstance(inner, SyncBatchNormAct)
    assert isinstance(inner.act, torch.nn.ReLU6)
    with torch.no_grad():
        assert torch.equal(synced(x), ref)  # eval mode: same running stats, same activation
    reverted = plugin.revert(synced).eval()
    assert type(reverted.get_submodule("blocks.1.0.bn1.norms.4")) is BatchNormAct2d
    with torch.no_grad():
        assert torch.equal(reverted(x), ref)
    # control: torch's converter drops the activation, so outputs change
    torch_synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(plugin.revert(synced)).eval()
    with torch.no_grad():
        assert not torch.equal(torch_synced(x), ref)
