"""P8: peak extra memory of one training step, quantized over FP32 (target <= 1.3).

Each variant runs in a fresh process (:mod:`experiments.bench.memory_probe`): build the model, Adam, one batch of
128 random 32 px images; then three ``zero_grad`` + forward + backward + ``Adam.step`` steps. The figure is the step's
extra memory (CPU: peak RSS minus the resident set before the steps; CUDA: ``max_memory_allocated`` minus
``memory_allocated``), quantized ({8,6,4,2} model at 4 bits, ``kernel`` as named) over FP32, same model and batch.
"""

from __future__ import annotations

from typing import Any

import torch

from experiments.bench.common import BenchResult
from experiments.bench.memory_probe import run_probe

__all__ = ["run"]

TARGET = "<= 1.3"
KERNELS = ("auto", "fused")  # the default (compile where a probe works, else fused) and the fallback


def bench_model(name: str, batch: int, device: str, kernels: tuple[str, ...] = KERNELS) -> list[BenchResult]:
    """FP32 and one quantized variant per kernel; one result per kernel."""
    base: dict[str, Any] = {"model": name, "batch_size": batch, "device": device}
    fp32 = run_probe({**base, "fp32": True})
    out = []
    for kernel in kernels:
        q = run_probe({**base, "bits": [8, 6, 4, 2], "active_bits": 4, "kernel": kernel})
        ratio = q["extra_mib"] / fp32["extra_mib"]
        what = "quantized step extra memory / FP32 step extra memory"
        details = {"model": name, "batch": batch, "image_size": 32, "device": device, "kernel": kernel,
                   "fp32": fp32, "quantized": q, "value": what}  # fmt: skip
        suffix = "" if kernel == "auto" else f"_{kernel}"
        title = f"P8 {name} step peak extra memory / FP32 (b{batch}, 32px, w4a4, kernel={kernel}, {device})"
        out.append(BenchResult(f"P8_{name}{suffix}", title, ratio, TARGET, details=details))
    return out


def run(quick: bool = False) -> list[BenchResult]:
    """P8 for cifar_resnet20 and resnet18 (on CUDA when available)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quick:
        return bench_model("cifar_resnet20", 32, device, ("auto",))
    return [*bench_model("cifar_resnet20", 128, device), *bench_model("resnet18", 128, device)]


if __name__ == "__main__":
    for r in run():
        print(r.key, f"{r.value:.3f}", r.target, r.details["fp32"], r.details["quantized"])
