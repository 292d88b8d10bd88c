"""P8: peak extra memory of one training step, quantized over FP32 (target <= 1.3).

Each variant runs in a fresh process (:mod:`experiments.bench.memory_probe`): build the model, Adam, one batch of
128 random 32 px images; then three ``zero_grad`` + forward + backward + ``Adam.step`` steps. The figure is the step's
extra memory (CPU: peak RSS minus the resident set before the steps; CUDA: ``max_memory_allocated`` minus
``memory_allocated``), quantized ({8,6,4,2} model at 4 bits, ``kernel`` as named) over FP32, same model and batch.

On CPU the probes run with a fixed glibc mmap threshold (:data:`~experiments.bench.memory_probe.FIXED_MMAP`):
with glibc's default, freed tensors stay in the heap wherever they landed and the peak RSS of the same FP32 step
varied from 259 to 335 MiB between fresh processes (quantized variants likewise, so the ratio moved between 1.29
and 1.55 for unchanged code); with it, repeated runs agree within 0.5 MiB. Each variant still runs ``rounds`` times
(the variants interleaved round by round) and the ratio is of the means; every run is kept in the details.

The details also give the same ratio with a two-image training step before the measured steps (``warm_step``:
one-off costs of a first backward left out, such as the compiled kernel's backward graphs, compiled in the first
step otherwise), as many runs each. The peak is reset to the current RSS right before
the measured steps (:mod:`experiments.bench.memory_probe`).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from experiments.bench.brevitas_reference import brevitas_missing
from experiments.bench.common import BenchResult
from experiments.bench.memory_probe import FIXED_MMAP, run_probe

__all__ = ["run"]

TARGET = "<= 1.3"
KERNELS = ("auto", "fused")  # the default (compile where a probe works, else fused) and the fallback


def bench_model(
    name: str, batch: int, device: str, kernels: tuple[str, ...] = KERNELS, rounds: int = 3, warm: bool = True,
    brevitas: bool = False,
) -> list[BenchResult]:  # fmt: skip
    """FP32 and one quantized variant per kernel, ``rounds`` fresh processes each (``warm``: plus one ``warm_step``
    run each, in the details); one result per kernel. ``brevitas``: the Brevitas reference too, when installed (its
    ratio in the first result's details)."""
    base: dict[str, Any] = {"model": name, "batch_size": batch, "device": device}
    specs: dict[str, dict[str, Any]] = {"fp32": {**base, "fp32": True}}
    specs.update({k: {**base, "bits": [8, 6, 4, 2], "active_bits": 4, "kernel": k} for k in kernels})
    missing = brevitas_missing() if brevitas else None
    if brevitas and missing is None:
        specs["brevitas"] = {**base, "brevitas": True, "active_bits": 4}
    env = FIXED_MMAP if device == "cpu" else {}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in specs}
    for _ in range(rounds):
        for key, spec in specs.items():
            runs[key].append(run_probe(spec, env=env))
    extra = {k: [r["extra_mib"] for r in v] for k, v in runs.items()}
    warm_mib: dict[str, list[float]] = {k: [] for k in specs} if warm else {}
    for _ in range(rounds if warm else 0):  # the same without one-off costs (compiled graphs, ...), as many runs
        for key, spec in specs.items():
            warm_mib[key].append(run_probe({**spec, "warm_step": True}, env=env)["extra_mib"])
    fp32_mean = statistics.fmean(extra["fp32"])
    out = []
    for kernel in kernels:
        ratio = statistics.fmean(extra[kernel]) / fp32_mean
        what = f"mean quantized step extra memory / mean FP32 step extra memory ({rounds} fresh processes each)"
        details = {"model": name, "batch": batch, "image_size": 32, "device": device, "kernel": kernel, "env": env,
                   "rounds": rounds, "extra_mib": {"fp32": extra["fp32"], "quantized": extra[kernel]},
                   "per_run_ratio_min_max": [min(extra[kernel]) / max(extra["fp32"]),
                                             max(extra[kernel]) / min(extra["fp32"])],
                   "fp32": runs["fp32"], "quantized": runs[kernel], "value": what}  # fmt: skip
        if warm_mib:
            details["warm_step_extra_mib"] = {"fp32": warm_mib["fp32"], "quantized": warm_mib[kernel]}
            details["warm_step_ratio"] = statistics.fmean(warm_mib[kernel]) / statistics.fmean(warm_mib["fp32"])
        if brevitas and kernel == kernels[0]:  # the same rounds: Brevitas' step over the FP32 step
            details["brevitas_extra_mib"] = extra.get("brevitas")
            details["brevitas_ratio"] = statistics.fmean(extra["brevitas"]) / fp32_mean if "brevitas" in extra else None
            if "brevitas" in warm_mib:
                details["brevitas_warm_step_ratio"] = statistics.fmean(warm_mib["brevitas"]) / statistics.fmean(
                    warm_mib["fp32"]
                )
            if missing is not None:
                details["brevitas_missing"] = missing
        suffix = "" if kernel == "auto" else f"_{kernel}"
        title = f"P8 {name} step peak extra memory / FP32 (b{batch}, 32px, w4a4, kernel={kernel}, {device})"
        out.append(BenchResult(f"P8_{name}{suffix}", title, ratio, TARGET, details=details))
    return out


def run(quick: bool = False) -> list[BenchResult]:
    """P8 for cifar_resnet20 and resnet18 (on CUDA when available)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quick:
        return bench_model("cifar_resnet20", 32, device, ("auto",), rounds=1, warm=False)
    models = ("cifar_resnet20", "resnet18")
    return [bench for name in models for bench in bench_model(name, 128, device, rounds=2, brevitas=True)]


if __name__ == "__main__":
    for r in run():
        print(r.key, f"{r.value:.3f}", r.target, r.details["fp32"], r.details["quantized"])
