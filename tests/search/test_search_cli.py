"""dbq-search / dbq-export / dbq-eval config checks: fast ConfigErrors naming the key, before torch is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_dbq.cli.schema import check_eval_config, check_export_config, check_search_config, parse_config_ref
from lightning_dbq.cli.validate import ConfigError


def _cfg(**kw):
    return OmegaConf.create(kw)


def test_search_config_errors_name_the_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    ok = {"checkpoint": str(ckpt), "method": "dp", "cost": "hawq", "budgets": None, "max_bops": None,
          "hessian": {"min_samples": 8, "max_samples": 64, "rel_tol": 0.05}}  # fmt: skip
    check_search_config(_cfg(**ok))
    cases = [
        ({"method": "greedy"}, r"^method: got 'greedy'; allowed: \['dp', 'ilp'\]"),
        ({"cost": "l2"}, r"^cost: got 'l2'; allowed: \['hawq', 'paper'\]"),
        ({"budgets": [1, 4]}, r"^budgets: got \[1, 4\] .*in \[2, 8\]"),
        ({"budgets": []}, r"^budgets: got \[\]"),
        ({"max_bops": 1e9}, r"^max_bops: needs method=ilp"),
        ({"hessian": {"min_samples": 9, "max_samples": 4, "rel_tol": 0.1}}, r"^hessian.min_samples: 9 exceeds"),
        ({"hessian": {"min_samples": 1, "max_samples": 4, "rel_tol": 0}}, r"^hessian.rel_tol: got 0"),
        ({"traces": str(tmp_path / "t.json")}, r"^traces: .*t.json' does not exist"),
        ({"checkpoint": str(tmp_path / "x.ckpt")}, r"^checkpoint: .*x.ckpt' does not exist"),
        ({"checkpoint": "???"}, r"^checkpoint: missing; give checkpoint=PATH"),
        ({"seed": -1}, r"^seed: got -1"),
    ]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match):
            check_search_config(_cfg(**{**ok, **change}))


def test_export_and_eval_config_errors_name_the_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    (tmp_path / "p.json").write_text("[]")
    assert parse_config_ref(f"{tmp_path}/p.json#3") == (tmp_path / "p.json", 3)
    assert parse_config_ref(f"{tmp_path}/p.json@0") == (tmp_path / "p.json", 0)
    with pytest.raises(ConfigError, match=r"^config: got .*p.json#x'; expected PATH#ROW"):
        parse_config_ref(f"{tmp_path}/p.json#x")
    base = {"checkpoint": str(ckpt), "bits": 4, "config": None, "format": "onnx", "onnx_mode": "exact"}
    check_export_config(_cfg(**base))
    for change, match in (({"bits": 9}, r"^bits: got 9 .*<= 8"), ({"bits": "4"}, r"^bits: got '4' \(str\)"),
                          ({"format": "tflite"}, r"^format: got 'tflite'"),
                          ({"bits": None}, r"^bits, config: .*got neither")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            check_export_config(_cfg(**{**base, **change}))
    ev = {"checkpoint": str(ckpt), "bits": None, "runtime": "torch", "onnx_mode": "exact",
          "latency": {"batch_size": 8, "warmup": 0, "batches": 1},
          "data": {"_target_": "x.SyntheticDataModule"}}  # fmt: skip
    check_eval_config(_cfg(**ev))
    check_eval_config(_cfg(**{**ev, "bits": [8, 4]}))
    for change, match in (({"bits": [8, 1]}, r"^bits: got \[8, 1\]"), ({"runtime": "tvm"}, r"^runtime: got 'tvm'"),
                          ({"latency": {"batch_size": 0, "warmup": 0, "batches": 1}}, r"^latency.batch_size: got 0"),
                          ({"max_images": 0}, r"^max_images: got 0"),
                          ({"pareto": str(tmp_path / "q.json")}, r"^pareto: .*q.json' does not exist")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            check_eval_config(_cfg(**{**ev, **change}))


def test_the_checks_import_no_torch() -> None:
    code = "import sys, lightning_dbq.cli.schema; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
