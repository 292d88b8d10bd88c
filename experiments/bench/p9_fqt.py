"""P9: one fully-quantized-training step / one QAT step, same model and forward bits (target <= 1.5).

One "step" = ``zero_grad`` + forward + cross-entropy + backward + ``Adam.step`` on one fixed batch (random images
and labels), as in P1. Every variant is a deep copy of one ``prepare(model, bits=[4])`` model (w4a4 forward, first
and last layers FP); the FQT variants add :func:`lightning_dbq.fqt.enable_grad_quant` with one estimator each:
``psq8`` (the INT8 reference), ``psq1``, ``bhq1``, ``agp`` (4 bits, keep 0.25, SCQ: the 1-bit-FQT method, average
1 bit) and ``topk`` (the public code's biased pruning). The backward is *simulated*: the estimators quantize ``gY``
in float and the two conv/linear gradient GEMMs still run in FP32, so FQT can only cost time here; the figure
bounds the overhead of the estimators, it is not the speed of integer kernels.

Breakdown per variant (``details``): step and forward medians (interleaved), backward + optimizer = step − forward,
and the estimators' own time from ``torch.profiler`` (the ``dbq.fqt.quantize_grad`` range around every FQT
backward's quantization, mean over 3 profiled steps).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lightning_dbq as dbq
from experiments.bench.common import BenchResult, interleaved_times, median, setup_torch
from experiments.bench.p1_step import step_fn
from lightning_dbq.fqt import enable_grad_quant
from lightning_dbq.fqt.functions import PROFILE_RANGE
from lightning_dbq.quant.factory import create_fp_model

__all__ = ["METHODS", "run"]

TARGET = "<= 1.5"
MAIN = "agp"
METHODS: dict[str, dict[str, Any] | None] = {
    "qat": None,
    "psq8": {"method": "psq", "bits": 8},
    "psq1": {"method": "psq", "bits": 1},
    "bhq1": {"method": "bhq", "bits": 1},
    "agp": {"method": "agp", "bits": 4, "keep": 0.25},
    "topk": {"method": "topk", "bits": 4, "keep": 0.25},
}


def _forward_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def fwd() -> None:
        F.cross_entropy(model(x), y)

    return fwd


def _estimator_ms(step: Callable[[], None], rounds: int = 3) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    total_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == PROFILE_RANGE)
    return total_us / 1e3 / rounds


def bench_model(key: str, name: str, batch: int, warmup: int, repeats: int) -> BenchResult:
    """Interleaved step and forward timing of every estimator on ``name``, plus the profiled estimator time."""
    setup_torch()
    base = dbq.prepare(create_fp_model(name, num_classes=10), bits=[4])
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with torch.no_grad():
        base.train()(x[:8])  # activation scales initialised once, shared by every copy
    models = {}
    for variant, grad in METHODS.items():
        models[variant] = copy.deepcopy(base)
        enable_grad_quant(models[variant], grad)
    steps = {f"step_{v}": step_fn(m, x, y) for v, m in models.items()}
    fwds = {f"fwd_{v}": _forward_fn(m, x, y) for v, m in models.items()}
    times = interleaved_times({**steps, **fwds}, warmup=warmup, repeats=repeats)
    med = {k: median(v) for k, v in times.items()}
    per_round = {v: [s / q for s, q in zip(times[f"step_{v}"], times["step_qat"], strict=True)] for v in METHODS}
    breakdown = {}
    for v in METHODS:
        est = _estimator_ms(steps[f"step_{v}"]) if METHODS[v] is not None else 0.0
        step_ms, fwd_ms = 1e3 * med[f"step_{v}"], 1e3 * med[f"fwd_{v}"]
        breakdown[v] = {"step_ms": step_ms, "forward_ms": fwd_ms, "backward_and_optimizer_ms": step_ms - fwd_ms,
                        "estimators_ms": est, "estimators_share_of_step": est / step_ms,
                        "over_qat": median(per_round[v])}  # fmt: skip
    ratio = breakdown[MAIN]["over_qat"]
    details: dict[str, Any] = {
        "model": name,
        "batch": batch,
        "image_size": 32,
        "forward_bits": 4,
        "methods": METHODS,
        "warmup": warmup,
        "repeats": repeats,
        "value": f"median over rounds of ({MAIN} FQT step / QAT step), variants back to back",
        "breakdown": breakdown,
        "times_s": times,
    }
    if ratio > float(TARGET.split()[1]):
        details["why"] = (
            f"{ratio:.2f}x: the simulated estimators (range, noise, rounding, water-filling, per-sample and "
            f"per-channel copies) take {100 * breakdown[MAIN]['estimators_share_of_step']:.0f} % of the step; "
            "both gradient GEMMs still run in FP32"
        )
    title = f"P9 {name} FQT step ({MAIN} 4b/keep 0.25) / QAT step (b{batch}, 32px, w4a4, simulated backward)"
    return BenchResult(key, title, ratio, TARGET, details=details)


def run(quick: bool = False) -> list[BenchResult]:
    """P9 for cifar_resnet20 and resnet18."""
    if quick:
        return [bench_model("P9_cifar_resnet20", "cifar_resnet20", batch=32, warmup=1, repeats=2)]
    return [
        bench_model("P9_cifar_resnet20", "cifar_resnet20", batch=128, warmup=2, repeats=9),
        bench_model("P9_resnet18", "resnet18", batch=64, warmup=1, repeats=5),
    ]


if __name__ == "__main__":
    for r in run():
        over = {k: round(v["over_qat"], 3) for k, v in r.details["breakdown"].items()}
        print(r.key, f"{r.value:.3f}", r.target, over)
