"""Run the benchmarks P1-P9 (+ the P1 kernel follow-up) and write ``bench.json`` and the README table.

Usage::

    uv run python -m experiments.bench.run_all                 # full run (make bench), writes the results
    uv run python -m experiments.bench.run_all --only P3,P4    # refresh a subset (other entries are kept)
    uv run python -m experiments.bench.run_all --quick         # smoke run (< 2 min), prints only

Names for ``--only``: P1, P2, P3, P4, P5, P6, P7, P8, P9 and P1k (kernel variants of P1; part of the full run, not of
``--quick``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.bench import (
    p1_kernels,
    p1_step,
    p2_epoch,
    p3_switch,
    p4_size,
    p5_hessian,
    p6_pareto,
    p7_serve,
    p8_memory,
    p9_fqt,
)
from experiments.bench.common import BenchResult, fmt, setup_torch
from experiments.bench.report import merge_json, write_readme_block

__all__ = ["BENCHES", "main"]

ROOT = Path(__file__).resolve().parents[2]
BENCHES: dict[str, Callable[[bool], list[BenchResult]]] = {
    "P1": p1_step.run,
    "P2": p2_epoch.run,
    "P3": p3_switch.run,
    "P4": p4_size.run,
    "P5": p5_hessian.run,
    "P6": p6_pareto.run,
    "P7": p7_serve.run,
    "P8": p8_memory.run,
    "P9": p9_fqt.run,
}
EXTRA = {"P1k": ("P1_kernels", p1_kernels.run)}


def _line(r: BenchResult) -> str:
    unit = " s" if r.unit == "s" else "x"
    return f"{r.key:<26} {fmt(r.value) + unit:>10}   target {r.target:<8} {'met' if r.met else 'NOT MET'}"


def _summary(kernels: dict[str, Any]) -> str:
    lines = []
    for name, d in kernels.items():
        if "over_fp32" in d:
            lines.append(f"  {name} step / fp32: " + " ".join(f"{k}={fmt(v)}x" for k, v in d["over_fp32"].items()))
        else:
            lines += [f"  {name} {t}: " + " ".join(f"{k}={fmt(v)}" for k, v in m.items()) for t, m in d.items()]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats; writes nothing unless --out")
    p.add_argument("--only", default="", help="comma-separated subset, e.g. P3,P4 (names: P1..P9, P1k)")
    p.add_argument("--out", type=Path, default=None, help="bench.json path (default experiments/results/bench.json)")
    p.add_argument("--readme", type=Path, default=ROOT / "experiments" / "README.md", help="README with the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make bench``."""
    args = _parse(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [*BENCHES, *([] if args.quick else EXTRA)]
    unknown = [n for n in names if n not in BENCHES and n not in EXTRA]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {[*BENCHES, *EXTRA]}")
    setup_torch()
    results: list[BenchResult] = []
    explorations: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        if name in EXTRA:
            key, fn = EXTRA[name]
            explorations[key] = fn(args.quick)
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s\n{_summary(explorations[key])}", flush=True)
            continue
        for r in BENCHES[name](args.quick):
            results.append(r)
            print(_line(r), flush=True)
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nall done in {time.perf_counter() - t_start:.0f} s{' (quick)' if args.quick else ''}")
    for r in results:
        print(_line(r))
    default = None if args.quick else ROOT / "experiments" / "results" / "bench.json"
    out = args.out if args.out is not None else default
    if out is not None:
        data = merge_json(out, results, explorations, args.quick)
        write_readme_block(args.readme, data)
        print(f"wrote {out} and the table in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
