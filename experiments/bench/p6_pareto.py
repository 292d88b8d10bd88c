"""P6: the whole exact Pareto front (``pareto_front_dp``) of a 54-layer x 4-bit instance (target <= 2 s, absolute).

The instance has ResNet-50's parameter counts: the 54 conv/linear weights of timm ``resnet50`` (53 convolutions + the
classifier, ~25.5 M parameters), bits {8, 6, 4, 2}, and a HAWQ-like cost ``c[l, j] = t_l * n_l * 4^(-b_j) * u_lj``
with log-normal per-parameter traces ``t_l`` and a random factor ``u_lj`` in [0.5, 1.5] (seeded): costs decrease
with bits, as real Double Rounding errors do. Timed: ``pareto_front_dp(problem)`` from the problem to the list of
``Allocation`` objects (the DP merge and building every front configuration), median of several runs after one
warm-up.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import timm
from torch import nn

from experiments.bench.common import BenchResult, setup_torch
from lightning_dbq.search.ilp import BitAllocationProblem, pareto_front_dp

__all__ = ["instance", "run"]

TARGET = "<= 2"
BITS = (8, 6, 4, 2)


def instance(seed: int = 0) -> BitAllocationProblem:
    """The 54-layer x 4-bit instance with ResNet-50 parameter counts."""
    model = timm.create_model("resnet50", num_classes=1000)
    named = [(n, m.weight.numel()) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rng = np.random.default_rng(seed)
    n = np.array([p for _, p in named], dtype=np.float64)
    traces = rng.lognormal(mean=-5.0, sigma=1.5, size=len(named))
    err = 4.0 ** (-np.asarray(BITS, dtype=np.float64))[None, :] * rng.uniform(0.5, 1.5, size=(len(named), len(BITS)))
    cost = traces[:, None] * n[:, None] * err
    return BitAllocationProblem(
        layers=tuple(name for name, _ in named), params=tuple(p for _, p in named), bits=BITS, cost=cost
    )


def run(quick: bool = False) -> list[BenchResult]:
    """P6 timing."""
    setup_torch()
    problem = instance()
    repeats = 3 if quick else 7
    front = pareto_front_dp(problem)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        front = pareto_front_dp(problem)
        times.append(time.perf_counter() - t0)
    value = statistics.median(times)
    details = {
        "layers": len(problem.layers),
        "bits": list(BITS),
        "total_params": problem.total_params,
        "front_size": len(front),
        "repeats": repeats,
        "times_s": times,
        "note": "absolute wall-clock seconds on this CPU (1 thread), not a ratio",
    }
    title = "P6 exact Pareto front, 54 layers x 4 bits (ResNet-50 sizes)"
    return [BenchResult("P6_pareto", title, value, TARGET, "s", details)]


if __name__ == "__main__":
    for r in run():
        print(r.key, f"{r.value:.3f} s", r.target, r.details["front_size"])
