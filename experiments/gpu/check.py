"""``make gpu-check``: everything worth knowing from a short loan of a GPU, in one script (budget: 8 minutes).

    uv run python -m experiments.gpu.check              # on a CUDA machine (refuses to run without one)
    GPU_SMOKE=1 uv run python -m experiments.gpu.check  # smoke mode: tiny sizes, runs on the CPU (CI runs it)

Steps, in order (a failing step is recorded and the next one still runs; the exit status is 1 if any failed):

1. ``pytest -m gpu``: CUDA kernels equal the CPU forward, bf16 autocast keeps the quantizer math in float32, the
   dbq strategy trains on the device (smoke on CPU: the same tests on the CPU device, ``DBQ_TEST_DEVICE=cpu``);
2. P1 (bit-pass step / FP32 step) and P8 (step peak extra memory / FP32) on the device, default kernel;
3. the full-data CIFAR-10 study (:mod:`experiments.gpu.study`) in the time left, from the uint8 cache
   (:mod:`experiments.gpu.data`; built from ``--data`` on first use).

Environment: ``GPU_SMOKE=1`` (smoke), ``GPU_CHECK_BUDGET_S`` (total seconds, default 480), ``GPU_DATA_CACHE``
(cache folder, default ``experiments/gpu/cache``), ``GPU_CHECK_KERNEL`` (fake-quant back-end, default ``auto``).
Results: ``experiments/results/gpu/gpu_check_<device>.json`` (smoke: ``experiments/results/smoke/gpu_check.json``),
with the device name, torch version and every step's figures or error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"
RESULTS = ROOT / "experiments" / "results"
SMOKE_SIZES: dict[str, Any] = {"val_per_class": 5, "train_subset": 100, "budget_s": 240, "max_epochs": 1}

__all__ = ["main", "results_path"]


def results_path(device_name: str, smoke: bool) -> Path:
    """Where the results JSON goes (one file per device name; smoke runs in the ignored smoke folder)."""
    if smoke:
        return RESULTS / "smoke" / "gpu_check.json"
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "device"
    return RESULTS / "gpu" / f"gpu_check_{slug}.json"


def _step(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    t0 = time.time()
    print(f"[gpu-check] {name} ...", flush=True)
    try:
        report[name] = {"ok": True, "result": fn()}
    except Exception as e:  # noqa: BLE001 - recorded with its traceback; the exit status reports it
        traceback.print_exc()
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    report[name]["elapsed_s"] = round(time.time() - t0, 1)
    print(f"[gpu-check] {name}: {'ok' if report[name]['ok'] else 'FAILED'} in {report[name]['elapsed_s']} s")


def _tests(device: str) -> dict[str, Any]:
    env = {**os.environ, "DBQ_TEST_DEVICE": device, "DBQ_KERNEL_AUTO": ""}  # the real probe on the device
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/gpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m gpu failed (rc {proc.returncode}): {tail}")
    if "passed" not in tail or "skipped" in tail:
        raise RuntimeError(f"pytest -m gpu ran no test or skipped some on {device}: {tail}")
    return {"summary": tail, "device": device}


def _bench(device: str, smoke: bool, kernel: str) -> dict[str, Any]:
    import timm

    from experiments.bench import p1_step, p8_memory
    from lightning_dbq.quant.factory import create_fp_model

    batch, warmup, repeats = (16, 1, 2) if smoke else (128, 5, 30)
    out: dict[str, Any] = {}
    models = [("cifar_resnet20", create_fp_model("cifar_resnet20", num_classes=10))]
    if not smoke:  # smoke: one model is enough to check the plumbing (each P8 probe compiles in a fresh process)
        models.append(("resnet18", timm.create_model("resnet18", num_classes=10)))
    for name, model in models:
        r = p1_step.bench_model(f"P1_{name}", name, model, batch, warmup, repeats, kernel=kernel, device=device)
        out[r.key] = {"value": r.value, "target": r.target, "met": r.met, "median_s": r.details["median_s"],
                      "first_dbq_step_s": r.details["first_dbq_step_s"]}  # fmt: skip
        rounds = 3 if device == "cpu" and not smoke else 1  # CUDA's allocator statistics do not vary by run
        for m in p8_memory.bench_model(name, batch, device, (kernel,), rounds=rounds, warm=False):
            out[m.key] = {"value": m.value, "target": m.target, "met": m.met,
                          "fp32_extra_mib": m.details["extra_mib"]["fp32"],
                          "quantized_extra_mib": m.details["extra_mib"]["quantized"]}  # fmt: skip
        print(f"[gpu-check] {name}: " + ", ".join(f"{k}={v['value']:.3f}" for k, v in out.items() if name in k))
    return out


def _study(device: str, smoke: bool, kernel: str, deadline: float, cache: Path, data: Path) -> dict[str, Any]:
    from experiments.gpu.data import DeviceBatches, build_cache, load_cache
    from experiments.gpu.study import run_study

    if not (cache / "meta.json").is_file():
        if not data.is_dir():
            raise FileNotFoundError(f"no image cache at {cache} and no CIFAR-10 JPEG tree at {data} to build it from; "
                                    "pack one with `python -m experiments.gpu.data` and copy it there")  # fmt: skip
        sizes = {k: SMOKE_SIZES[k] for k in ("val_per_class", "train_subset")} if smoke else {}
        build_cache(data, cache, **sizes)
    images, targets, train_rows, val_rows, meta = load_cache(cache)
    train = DeviceBatches(images[train_rows], targets[train_rows], 128, train=True, seed=0, device=device)
    val = DeviceBatches(images[val_rows], targets[val_rows], 500, train=False, device=device)
    runs = ROOT / "experiments" / "gpu" / "runs" / ("smoke" if smoke else "full")
    cap = SMOKE_SIZES["max_epochs"] if smoke else None
    budget_s = max(deadline - time.time(), 1.0)  # what is left after decoding
    result = run_study(train, val, budget_s, runs, kernel=kernel, max_epochs=cap)
    result["data"] = {"train": len(train_rows), "val": len(val_rows), "cache": str(cache)}
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the three steps; write the results JSON; 0 when every step passed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 ImageFolder tree (to build the cache)")
    p.add_argument("--steps", default="tests,bench,study", help="comma-separated subset of tests,bench,study")
    args = p.parse_args(argv)
    smoke = os.environ.get("GPU_SMOKE", "") not in ("", "0")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", SMOKE_SIZES["budget_s"] if smoke else 480))
    kernel = os.environ.get("GPU_CHECK_KERNEL", "auto")
    default_cache = ROOT / "experiments" / "gpu" / ("cache_smoke" if smoke else "cache")
    cache = Path(os.environ.get("GPU_DATA_CACHE", default_cache))
    steps = [s for s in args.steps.split(",") if s]
    if unknown := sorted(set(steps) - {"tests", "bench", "study"}):
        p.error(f"--steps: unknown {unknown}; allowed: tests, bench, study")
    if torch.cuda.is_available():
        device, device_name = "cuda", torch.cuda.get_device_name(0)
    elif smoke:
        device, device_name = "cpu", "cpu (smoke)"
    else:
        print("[gpu-check] no CUDA device: run GPU_SMOKE=1 make gpu-check for the CPU smoke mode", file=sys.stderr)
        return 2
    start = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report: dict[str, Any] = {"device": device_name, "smoke": smoke, "torch": torch.__version__, "kernel": kernel,
                              "budget_s": budget, "started": started}  # fmt: skip
    if "tests" in steps:
        _step(report, "tests", lambda: _tests(device))
    if "bench" in steps:
        _step(report, "bench", lambda: _bench(device, smoke, kernel))
    if "study" in steps:
        deadline = start + budget - 20  # reserve: writing results, process exit
        _step(report, "study", lambda: _study(device, smoke, kernel, deadline, cache, args.data))
    report["elapsed_s"] = round(time.time() - start, 1)
    path = results_path(device_name, smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    failed = [s for s in steps if not report[s]["ok"]]
    print(f"[gpu-check] {device_name}: {report['elapsed_s']} s -> {path.relative_to(ROOT)}"
          + (f"; FAILED: {failed}" if failed else "; all steps passed"))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
