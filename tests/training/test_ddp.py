"""DDP with 2 CPU processes (gloo, spawn): per-bit passes, identical ranks, guard without find_unused_parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ddp
ROOT = Path(__file__).resolve().parents[2]


def _run(mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tests.helpers.ddp_job", mode, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_bit_switch_strategy(tmp_path: Path, report) -> None:
    proc = _run("module", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(tmp_path)
    for r in (r0, r1):
        assert r["backward_calls"] == r["batches"] * 3  # batches × bits
    assert r0["batches"] == r1["batches"] == 2 * 3  # 96 train samples / 2 ranks / 16 per batch × 2 epochs
    assert r0["state_hash"] == r1["state_hash"]  # weights, scales, per-bit norms and buffers identical
    report(
        f"DDP 2×CPU dbq_ddp_spawn: backward passes per rank = {r0['backward_calls']} = {r0['batches']} batches × 3 bits"
    )


def test_ddp_dropin_callback_with_stock_strategy(tmp_path: Path) -> None:
    proc = _run("dropin", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(tmp_path)
    assert r0["backward_calls"] == r0["batches"] * 3
    assert r0["state_hash"] == r1["state_hash"]
    assert {"val/acc_w8a8", "val/acc_w4a4", "val/acc_w2a2", "val/acc_min"} <= set(r0["metrics"])


def test_ddp_without_find_unused_parameters_fails_clearly(tmp_path: Path) -> None:
    proc = _run("no_find_unused", tmp_path)
    assert proc.returncode != 0
    assert "DDP needs find_unused_parameters=True" in proc.stderr


def test_ddp_hessian_traces_shard_images_and_agree(tmp_path: Path) -> None:
    """Each rank profiles half of the 64 calibration images (not all 64 twice) and both end with the same traces."""
    proc = _run("hessian", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(tmp_path)
    assert r0["hessian_images"] == r1["hessian_images"] == 32
    assert r0["traces"] == r1["traces"] and set(r0["traces"]) == {"conv2", "conv3"}
