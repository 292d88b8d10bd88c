"""``quant.grad`` in dbq-train: defaults, validation before training (naming the key), and a tiny FQT run; the
DBQModule and DoubleRoundingQAT ``grad_quant`` arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dbq.cli.schema import check_config_types
from lightning_dbq.cli.train import grad_quant_options, train
from lightning_dbq.cli.validate import ConfigError
from lightning_dbq.fqt import GradQuantConfig, grad_quant_config
from tests.helpers.hydra import compose_train

TINY = [
    "data=synthetic", "data.num_samples=96", "data.image_size=8", "trainer.max_epochs=1", "logger=none",
    "callbacks.progress_bar=null", "test=false", "model.name=cifar_resnet20", "quant.bits=[8,4]",
]  # fmt: skip
AGP = [
    "quant.grad.method=agp",
    "quant.grad.bits=4",
    "quant.grad.keep=0.25",
]  # the command: a method turns FQT on


_compose = compose_train


@pytest.mark.parametrize("quant", ["multi", "low"])
def test_defaults_are_off_and_a_method_gives_the_config(quant: str) -> None:
    cfg = _compose([f"quant={quant}"])
    assert dict(cfg.quant.grad) == {"method": None, "bits": 8, "keep": 1.0, "scq": True}
    assert grad_quant_options(cfg) is None
    cfg = _compose([f"quant={quant}", *AGP, "seed=3"])
    check_config_types(cfg)
    opts = grad_quant_options(cfg)
    assert GradQuantConfig.from_mapping(opts) == GradQuantConfig(bits=4, method="agp", keep=0.25, scq=True, seed=3)
    assert grad_quant_options(_compose([*AGP, "+quant.grad.seed=9"]))["seed"] == 9


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["quant.grad.method=hadamard"], r"quant.grad.method: got 'hadamard' \(str\); allowed: null or \['ptq', 'psq'"),
        (["quant.grad.bits=0"], r"quant.grad.bits: got 0 \(int\); allowed: an integer >= 1 and <= 16"),
        (["quant.grad.bits=17"], "quant.grad.bits: got 17"),
        (["quant.grad.keep=0"], r"quant.grad.keep: got 0 \(int\); allowed: a finite number in \(0.0, 1.0\]"),
        (["quant.grad.keep=1.5"], "quant.grad.keep: got 1.5"),
        (
            ["quant.grad.method=psq", "quant.grad.keep=0.5"],
            r"quant.grad.keep: got 0.5 with quant.grad.method=psq; keep < 1 needs a pruning",
        ),
        (["quant.grad.scq=1"], "quant.grad.scq: got 1"),
    ],
)
def test_invalid_grad_options_fail_before_torch(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_config_types(_compose(overrides))


@pytest.mark.slow  # ~40 s on the 2-core box
def test_dbq_train_runs_with_agp_gradients(tmp_path: Path, report) -> None:
    cfg = _compose([*TINY, *AGP], output_dir=tmp_path)
    metrics = train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["val"]) == {"w8a8", "w4a4"}
    assert all(0.0 <= v["acc"] <= 1.0 for v in results["val"].values())
    ckpt = torch.load(tmp_path / results["checkpoint"], map_location="cpu", weights_only=True)  # plain hparams
    assert ckpt["hyper_parameters"]["grad_quant"] == {"seed": 0, "bits": 4, "method": "agp", "keep": 0.25,
                                                      "scq": True}  # fmt: skip
    report("dbq-train tiny FQT (agp 4-bit keep 0.25, 1 epoch synthetic): "
           + ", ".join(f"{k} {metrics[f'val/acc_{k}']:.3f}" for k in ("w8a8", "w4a4")))  # fmt: skip


def test_dbqmodule_and_callback_accept_grad_quant() -> None:
    from lightning_dbq.training import DBQModule, DoubleRoundingQAT
    from tests.helpers.tiny import TinyNet

    cfg = GradQuantConfig(bits=4, method="agp", keep=0.25)
    module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4], grad_quant=cfg)
    assert grad_quant_config(module.model) == cfg
    assert module.hparams["grad_quant"] == cfg.to_dict()  # a plain dict in the checkpoint
    assert grad_quant_config(DBQModule(TinyNet(), num_classes=4, bits=[8, 4]).model) is None
    with pytest.raises(ValueError, match="GradQuantConfig.keep: got 2"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 4], grad_quant={"keep": 2})
    cb = DoubleRoundingQAT(bits=[8, 4], grad_quant={"bits": 6})
    assert cb.grad_quant == GradQuantConfig(bits=6) and cb.state_dict()["grad_quant"]["bits"] == 6
    with pytest.raises(ValueError, match="unknown key"):
        DoubleRoundingQAT(bits=[8, 4], grad_quant={"bitz": 6})


def test_config_and_cli_validation_are_torch_free() -> None:
    code = (
        "import sys, lightning_dbq.fqt as f, lightning_dbq.cli.schema; from lightning_dbq.fqt import GradQuantConfig;"
        "GradQuantConfig(bits=4, method='agp', keep=0.25); print(sorted(m for m in ('torch', 'lightning') if m in "
        "sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
