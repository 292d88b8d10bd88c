"""Atomic writes (temp files swept after a crash, kill -9 loop) and training faults (divergence)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.training import DBQModule
from lightning_dbq.training.loop import DivergenceError
from tests.helpers.tiny import TinyNet
from tests.reliability.helpers import make_artifact

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partials_of_dead_writers_are_swept_live_ones_kept(tmp_path: Path) -> None:
    path = make_artifact(tmp_path)
    dead = tmp_path / f".dbq-{_dead_pid()}-deadbeef.partial"
    dead.write_bytes(b"\x00" * 1000)
    live = tmp_path / f".dbq-{os.getppid()}-cafecafe.partial"  # the pytest runner's parent is alive
    live.write_bytes(b"\x00" * 10)
    unrelated = tmp_path / "notes.partial"
    unrelated.write_text("mine")
    dbq.save_int(dbq.load_int(path), path)
    assert not dead.exists() and live.exists() and unrelated.exists()


def test_long_file_names_and_nested_folders(tmp_path: Path) -> None:
    name = "m" * (250 - len(".dbq.safetensors")) + ".dbq.safetensors"  # 250 bytes: legal on every common fs
    path = make_artifact(tmp_path / "a" / "b", name=name)
    assert path.name == name and len(name) == 250
    dbq.load_int(path)
    assert [p.name for p in path.parent.iterdir()] == [name]


def test_failed_save_keeps_the_old_artifact(tmp_path: Path) -> None:
    path = make_artifact(tmp_path)
    before = path.read_bytes()
    bad = dbq.load_int(path)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    with pytest.raises(dbq.ArtifactError):
        dbq.save_int(bad, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


_WRITER = textwrap.dedent(
    """
    import sys, torch, lightning_dbq as dbq
    torch.manual_seed(int(sys.argv[2]))
    model = dbq.create_model("resnet18", bits=[8, 6, 4, 2], num_classes=10)
    model(torch.randn(2, 3, 32, 32))
    print("ready", flush=True)
    while True:
        dbq.save_int(model.eval(), sys.argv[1])
    """
)


@pytest.mark.slow
def test_kill_9_during_save_int_25_times(tmp_path: Path, report) -> None:
    """A writer saving a resnet18 artifact (~11 MB) in a loop is killed while its temp file is being written, 25
    times: the file on disk always verifies and loads, and the next save sweeps every temp file the killed writers
    left."""
    path = make_artifact(tmp_path, name="target.dbq.safetensors")
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    left = []
    for i in range(25):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(i)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        # aim inside the write window: wait until this writer's temp file exists, then kill a moment later
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(f".dbq-{proc.pid}-*.partial")) and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.005))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        dbq.read_manifest(path)
        dbq.load_int(path)  # verifies the checksum over manifest and tensors
        left.append(len(list(tmp_path.glob(".dbq-*.partial"))))
    dbq.save_int(dbq.load_int(path), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.dbq.safetensors"]
    report(f"reliability: 25 kill -9 during save_int: artifact verified 25/25; temp files left before the sweep: "
           f"max {max(left)}, all swept by the next save")  # fmt: skip


def _fit(module: DBQModule, tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=16))
    return trainer


def test_divergence_stops_naming_the_bit(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], lr=1e6, scheduler="none")
    with pytest.raises(DivergenceError, match=r"loss is \S+ (\(not finite\) )?at w[842]a[842] \(global step \d+;"):
        _fit(module, tmp_path)
    pl.seed_everything(0)
    nan_module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], max_loss=None)
    with torch.no_grad():
        nan_module.model.fc.bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match=r"loss is nan \(not finite\) at w8a8 \(global step 0;"):
        _fit(nan_module, tmp_path)


def test_divergence_skip_mode_drops_the_steps(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], lr=1e6, scheduler="none", nonfinite="skip")
    _fit(module, tmp_path)
    assert module.dbq_state.skipped_steps > 0
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], nonfinite="ignore")


def test_cli_divergence_exits_nonzero_without_artifact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_dbq.cli.train", f"hydra.run.dir={out}", "optim.lr=1e6",
           "optim.scheduler=none", "trainer.max_epochs=2", "data.image_size=8", "quant.bits=[8,2]",
           "logger=none"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode != 0
    assert "training diverged" in proc.stderr + proc.stdout and "at w" in proc.stderr + proc.stdout
    assert "global step 0" in proc.stderr + proc.stdout or "global step 1" in proc.stderr + proc.stdout
    assert not list(out.rglob("*.dbq.safetensors")) and not (out / "results.json").exists()
