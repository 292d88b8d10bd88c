"""Tests marked ``gpu``: run by ``make gpu-check`` on the CUDA device (``DBQ_TEST_DEVICE=cpu``: on the CPU, smoke).

Without CUDA and without ``DBQ_TEST_DEVICE`` they are skipped (``make test`` lists them as skipped).
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.quant.functional import double_round_fake, lsq_fake
from lightning_dbq.quant.kernels import kernels
from lightning_dbq.training import DBQModule
from tests.helpers.tiny import TinyNet

pytestmark = pytest.mark.gpu


@pytest.fixture
def device() -> torch.device:
    """The device under test: ``DBQ_TEST_DEVICE`` if set, else CUDA when present, else skip."""
    name = os.environ.get("DBQ_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
    if not name:
        pytest.skip("no CUDA device (set DBQ_TEST_DEVICE=cpu to run these on the CPU)")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"DBQ_TEST_DEVICE={name!r} but torch sees no CUDA device")
        torch.backends.cudnn.allow_tf32 = False  # full-precision convs: device vs CPU comparisons
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


@pytest.mark.parametrize("kernel", ["eager", "fused", "compile", "auto"])
def test_kernels_on_device_equal_the_cpu_forward(device: torch.device, kernel: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, 8, 8, generator=gen) * 3
    w = torch.randn(32, 16, 3, 3, generator=gen) * 0.1
    s_act, s_w = torch.tensor(0.07), torch.tensor(0.1 / 64)
    k = kernels(kernel, device.type)
    for bits in (8, 4, 2):
        ref_a = lsq_fake(x, s_act, bits, True)
        ref_w = double_round_fake(w, s_w, 8, bits)
        out_a = k.lsq(x.to(device), s_act.to(device), bits, True)
        out_w = k.double_round(w.to(device), s_w.to(device), 8, bits)
        assert out_a.device.type == device.type and torch.equal(out_a.cpu(), ref_a), (kernel, bits)
        assert torch.equal(out_w.cpu(), ref_w), (kernel, bits)


def test_prepared_model_on_device_matches_cpu(device: torch.device) -> None:
    torch.manual_seed(0)
    net = dbq.prepare(TinyNet(width=16), bits=[8, 4, 2])
    x = torch.randn(32, 3, 16, 16)
    net.train()
    with torch.no_grad():
        net(x)  # activation-scale init on the CPU, then the same model on the device
    net.eval()
    for b in (8, 4, 2):
        dbq.set_bits(net, b)
        with torch.no_grad():
            ref = net(x)
            out = net.to(device)(x.to(device)).cpu()
            net.cpu()
        # convs differ in the last float bits across devices, which can move a value across a rounding boundary:
        # most logits agree to 1e-4 and the predictions agree
        close = torch.isclose(out, ref, atol=1e-4, rtol=1e-4).float().mean().item()
        assert close >= 0.9, (b, close)
        assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.9


def test_bf16_autocast_keeps_quantizer_math_in_float32(device: torch.device) -> None:
    torch.manual_seed(0)
    net = dbq.prepare(TinyNet(width=16), bits=[8, 4, 2]).to(device)
    dbq.set_bits(net, 4)
    x = torch.randn(16, 3, 16, 16, device=device)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    k = kernels("fused", device.type)
    xb = torch.randn(4096, device=device).bfloat16()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = k.lsq(xb, torch.tensor(0.05, device=device), 4, True)
        loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(16, dtype=torch.long, device=device))
        seen.append((out.dtype, loss.dtype))
    # the bf16 input is cast up, quantized in float32 and cast back: equal to the float32 math on the same values
    ref = lsq_fake(xb.float().cpu(), torch.tensor(0.05), 4, True).bfloat16()
    assert seen[0][0] == torch.bfloat16 and torch.equal(out.cpu(), ref)
    loss.backward()
    scales = [p for n, p in net.named_parameters() if "scale" in n and p.grad is not None]
    assert scales, "no quantizer scale received a gradient under autocast"
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in scales)
    assert all(torch.isfinite(p.grad).all() for p in scales)


def test_dbq_strategy_trains_on_the_device(device: torch.device, tmp_path) -> None:
    pl.seed_everything(0)
    module = DBQModule(TinyNet(width=8), num_classes=4, bits=[8, 4, 2], lr=1e-2)
    dm = SyntheticDataModule(num_samples=256, num_classes=4, image_size=8, batch_size=32)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, strategy="dbq", max_epochs=6, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, dm)
    assert all(p.device.type == device.type for p in module.parameters())
    accs = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/acc_w")}
    assert set(accs) == {"val/acc_w8a8", "val/acc_w4a4", "val/acc_w2a2"}
    assert min(accs.values()) >= 0.6, accs  # 4 classes: chance is 0.25
