"""Shared helpers of the benchmarks: the result record, interleaved timing, and the thread/seed setup."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchResult", "fmt", "interleaved_times", "median", "run_module", "setup_torch", "timed"]


@dataclass
class BenchResult:
    """One benchmark figure next to its target.

    Attributes:
        key: result key in ``bench.json`` (``"P1_resnet18"``, ...).
        title: one-line description for the table.
        value: the measured figure (a ratio, or seconds for P6).
        target: the target as text, ``"<= 1.15"`` or ``">= 3"``.
        unit: ``"x"`` for ratios, ``"s"`` for absolute times.
        details: everything else worth keeping (raw medians, repeats, settings, notes).
    """

    key: str
    title: str
    value: float
    target: str
    unit: str = "x"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        """Whether :attr:`value` satisfies :attr:`target`."""
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def to_json(self) -> dict[str, Any]:
        """The ``bench.json`` entry."""
        return {
            "title": self.title,
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "met": self.met,
            "details": self.details,
        }


def setup_torch(threads: int = 1, seed: int = 0) -> None:
    """One intra-op thread (two contended threads are 5-20x slower on the shared 2-core box) and a fixed seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of ``fn`` (``perf_counter``), with the GC collected before and off during."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time several variants round-robin (A, B, C, A, B, C, ...) so that load drift on a shared machine hits all alike.

    Args:
        fns: name -> zero-argument callable (one step / one pass).
        warmup: untimed calls of every variant first (allocator, oneDNN primitive caches, lazy init).
        repeats: timed rounds.

    Returns:
        name -> list of ``repeats`` wall-clock seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(timed(fn))
    return out


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(xs))


def fmt(x: float, digits: int = 3) -> str:
    """Compact number formatting for tables and logs."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return f"{x:.{digits - 1}e}"


def run_module(
    module: str, spec: Mapping[str, Any], timeout: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``python -m module JSON(spec)`` in a fresh process from the repository root (``env``: variables set on top of
    this process's environment); the JSON object on the last line of its stdout. Raises ``RuntimeError`` with the
    end of its stderr on failure."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True,
                          cwd=root, timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {dict(spec)} failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
