"""The core (lightning_dbq, quant/, search/) imports neither lightning nor hydra nor omegaconf."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf")


def test_core_imports_no_lightning_or_hydra() -> None:
    code = f"""
import importlib, pkgutil, sys
import lightning_dbq, lightning_dbq.quant
mods = ["lightning_dbq"]
for pkg in ("lightning_dbq.quant", "lightning_dbq.search"):
    try:
        p = importlib.import_module(pkg)
    except ModuleNotFoundError:
        continue
    mods += [pkg] + [pkg + "." + m.name for m in pkgutil.iter_modules(p.__path__)]
for m in mods:
    importlib.import_module(m)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print(len(mods), bad)
assert not bad, bad
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    n_modules = int(out.stdout.split()[0])
    assert n_modules >= 8  # the walk really imported the quant modules


def test_import_guard_detects_lightning() -> None:
    """The check above can fail: importing the training package does pull in lightning."""
    code = "import sys, lightning_dbq.training; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("True"), out.stderr
