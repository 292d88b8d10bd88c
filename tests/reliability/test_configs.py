"""Config values of the wrong type or range: ConfigError naming the key and the allowed values, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.schema import check_config_types
from lightning_dbq.cli.validate import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BAD: list[tuple[str, str]] = [
    ("quant.bits=8", "quant.bits"),
    ("quant.bits=[8,8]", "quant.bits"),
    ("quant.bits=[9,4]", "quant.bits"),
    ("quant.bits=[]", "quant.bits"),
    ("quant.bits=[8,a]", "quant.bits"),
    ("quant.bits=[8.0,4]", "quant.bits"),
    ("quant.bits=abc", "quant.bits"),
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.max_epochs=1.5", "trainer.max_epochs"),
    ("trainer.max_epochs=true", "trainer.max_epochs"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("optim.lr=abc", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("optim.label_smoothing=1", "optim.label_smoothing"),
    ("optim.optimizer=lamb", "optim.optimizer"),
    ("optim.scheduler=linear", "optim.scheduler"),
    ("optim.scale_lr=-1", "optim.scale_lr"),
    ("seed=-1", "seed"),
    ("seed=abc", "seed"),
    ("seed=1.5", "seed"),
    ("cpu_threads=0", "cpu_threads"),
    ("cpu_threads=two", "cpu_threads"),
    ("test=maybe", "test"),
    ("quant.algorithm=A3", "quant.algorithm"),
    ("quant.alrs=sometimes", "quant.alrs"),
    ("quant.kd=yes", "quant.kd"),
    ("quant.prepare.kernel=cuda", "quant.prepare.kernel"),
    ("quant.prepare.weight_mode=nested", "quant.prepare.weight_mode"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=abc", "data.batch_size"),
    ("data.image_size=4", "data.image_size"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.in_chans=2", "data.in_chans"),
    ("model.name=''", "model.name"),
    ("+model.num_classes=0", "model.num_classes"),
]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(("override", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_the_key(override: str, key: str) -> None:
    cfg = _compose(override)
    with pytest.raises(ConfigError, match="allowed") as info:
        check_config_types(cfg)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_defaults_and_good_values_pass() -> None:
    check_config_types(_compose())
    check_config_types(_compose("quant.bits=[4,3,2]", "optim=sgd", "trainer.max_epochs=-1", "seed=0"))


def test_ckpt_path_checks(tmp_path: Path) -> None:
    art = tmp_path / "model.dbq.safetensors"
    art.write_bytes(b"x")
    empty = tmp_path / "e.ckpt"
    empty.write_bytes(b"")
    text = tmp_path / "t.ckpt"
    text.write_text("epoch=3\n")
    cases = ((tmp_path / "none.ckpt", "is not a file"), (art, "int artifact"), (empty, "empty file"),
             (text, "not a torch/Lightning checkpoint"))  # fmt: skip
    for path, match in cases:
        with pytest.raises(ConfigError, match=f"ckpt_path: .*{match}"):
            check_config_types(_compose(f"ckpt_path={path}"))


def test_cli_fails_in_seconds_before_heavy_imports(tmp_path: Path, report) -> None:
    """The whole console script, from start to the error, on a bad value (quant.bits=8)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lightning_dbq.cli.train", "quant.bits=8",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode != 0 and "quant.bits: got 8 (int); allowed:" in proc.stderr
    report(f"reliability: dbq-train quant.bits=8 -> ConfigError after {seconds:.1f} s (limit 5 s on this machine)")
    assert seconds < 15  # generous for a loaded CI box; the figure itself is printed above
