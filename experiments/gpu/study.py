"""Full-data CIFAR-10 study sized to a time budget (the third part of ``make gpu-check``).

Arms (cifar_resnet20, 32 px, batch 128, Adam + cosine, the CPU study's recipe at full data): ``fp32`` (3E epochs),
then from its weights ``dr_8642_alrs`` and ``dr_8642_noalrs`` ({8,6,4,2}, E epochs of 4 bit-passes each), and
``lsq_w2`` / ``lsq_w4`` (one bit-width, 4E epochs: the same number of passes as a DR arm — compute-matched).
``E`` comes from :func:`plan_epochs`: a short timed probe of FP32 and quantized steps, then the largest ``E`` whose
total fits the budget (at least 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experiments.gpu.data import DeviceBatches

__all__ = ["ARMS", "GpuArm", "plan_epochs", "run_study"]

RECIPE: dict[str, Any] = {"batch_size": 128, "lr": 5e-4, "fp32_factor": 3, "model": "cifar_resnet20"}


@dataclass(frozen=True)
class GpuArm:
    """One arm: its bits (``()``: FP32), ALRS mode, and epochs as a multiple of ``E``."""

    name: str
    bits: tuple[int, ...]
    alrs: str = "paper"
    epoch_factor: int = 1

    @property
    def passes_per_epoch(self) -> int:
        """Forward-backward passes per training batch (one per candidate bit; FP32: one)."""
        return max(len(self.bits), 1)


ARMS = (
    GpuArm("fp32", (), epoch_factor=RECIPE["fp32_factor"]),
    GpuArm("dr_8642_alrs", (8, 6, 4, 2), "paper"),
    GpuArm("dr_8642_noalrs", (8, 6, 4, 2), "off"),
    GpuArm("lsq_w2", (2,), epoch_factor=4),
    GpuArm("lsq_w4", (4,), epoch_factor=4),
)


def plan_epochs(budget_s: float, fp32_epoch_s: float, pass_epoch_s: float, arms: tuple[GpuArm, ...] = ARMS) -> int:
    """The largest ``E >= 1`` with ``sum(arm epochs(E) x passes x epoch time) <= budget_s``.

    ``fp32_epoch_s``: one FP32 epoch (training + validation); ``pass_epoch_s``: one quantized single-bit epoch.
    """
    if fp32_epoch_s <= 0 or pass_epoch_s <= 0:
        raise ValueError(f"epoch times must be > 0, got {fp32_epoch_s}, {pass_epoch_s}")
    per_e = sum(a.epoch_factor * (fp32_epoch_s if not a.bits else a.passes_per_epoch * pass_epoch_s) for a in arms)
    return max(1, math.floor(budget_s / per_e))


def _timed_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Mean seconds per call of ``step`` (P1's step closure: it synchronises CUDA itself)."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def probe_epoch_times(train: DeviceBatches, kernel: str, steps: int = 10) -> tuple[float, float]:
    """Seconds of one FP32 epoch and one quantized single-bit (w4a4) epoch, extrapolated from timed steps."""
    import lightning_dbq as dbq
    from experiments.bench.p1_step import step_fn
    from lightning_dbq.quant.factory import create_fp_model

    x, y = next(iter(train))
    fp = create_fp_model(RECIPE["model"], num_classes=10).to(train.device)
    q = dbq.prepare(create_fp_model(RECIPE["model"], num_classes=10), bits=[8, 6, 4, 2], kernel=kernel).to(train.device)
    dbq.set_bits(q, 4)
    t_fp = _timed_steps(step_fn(fp, x, y), 3, steps)
    t_q = _timed_steps(step_fn(q, x, y), 3, steps)
    per_epoch = len(train) * 1.1  # + validation (5k images, forward only) and loop overhead
    return t_fp * per_epoch, t_q * per_epoch


def _fit(
    module: Any, epochs: int, train: DeviceBatches, val: DeviceBatches, out: Path, device: torch.device
) -> dict[str, Any]:
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator=device.type, devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, default_root_dir=out, enable_model_summary=False,
                         enable_progress_bar=False, num_sanity_val_steps=0,
                         precision="32-true")  # fmt: skip
    t0 = time.time()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"val": metrics, "epochs": epochs, "elapsed_s": round(time.time() - t0, 1)}


def run_study(
    train: DeviceBatches,
    val: DeviceBatches,
    budget_s: float,
    out: Path,
    *,
    kernel: str = "auto",
    arms: tuple[GpuArm, ...] = ARMS,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Train every arm within ``budget_s`` (epochs planned once, up front); results per arm.

    ``max_epochs`` caps ``E`` (smoke runs use 1).
    """
    import lightning.pytorch as pl

    from experiments.cifar10.fp32 import FPClassifier
    from lightning_dbq.training import DBQModule

    t_fp, t_q = probe_epoch_times(train, kernel)
    e = plan_epochs(budget_s, t_fp, t_q, arms)
    if max_epochs is not None:
        e = min(e, max_epochs)
    results: dict[str, Any] = {"plan": {"E": e, "budget_s": round(budget_s, 1), "fp32_epoch_s": round(t_fp, 2),
                                        "pass_epoch_s": round(t_q, 2), "kernel": kernel, **RECIPE}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    init = out / "fp32.ckpt"
    for arm in arms:
        pl.seed_everything(0)
        train.epoch = 0  # every arm sees the same shuffles and augmentations
        epochs = e * arm.epoch_factor
        module: pl.LightningModule
        if not arm.bits:
            module = FPClassifier(RECIPE["model"], 10, lr=RECIPE["lr"] * 4)
        else:
            if not init.is_file():
                raise RuntimeError(f"{arm.name}: needs the fp32 arm's weights ({init}); run the fp32 arm first")
            module = DBQModule(RECIPE["model"], 10, bits=arm.bits, alrs=arm.alrs, lr=RECIPE["lr"],
                               init_checkpoint=str(init), quant={"kernel": kernel})  # fmt: skip
        print(f"[gpu-study] {arm.name}: {epochs} epoch(s) x {arm.passes_per_epoch} pass(es)", flush=True)
        results[arm.name] = _fit(module, epochs, train, val, out / arm.name, train.device)
        if not arm.bits:
            torch.save({"state_dict": module.state_dict()}, init)
        print(f"[gpu-study] {arm.name}: {results[arm.name]}", flush=True)
    return results
