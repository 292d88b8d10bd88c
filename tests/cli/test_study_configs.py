"""Every arm of the CIFAR-10 study (experiments/cifar10/study.py) composes and validates as a dbq-train config,
so a typo in an override fails here rather than an hour into the study."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from experiments.cifar10.study import RECIPE, arm_overrides, study_arms
from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.validate import validate_train_config

QUANTIZED = [a for a in study_arms() if a.name != "fp32"]


@pytest.mark.parametrize("arm", QUANTIZED, ids=[a.name for a in QUANTIZED])
@pytest.mark.parametrize("kernel", [None, "compile"])
def test_study_arm_overrides_compose_and_validate(arm, kernel: str | None, tmp_path: Path) -> None:
    overrides = arm_overrides(arm, RECIPE, tmp_path / arm.name, tmp_path / "fp32.ckpt", kernel)
    overrides = [o if not o.startswith("data.root=") else f"data.root={tmp_path}" for o in overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate_train_config(cfg)
    assert cfg.trainer.max_epochs == RECIPE["qat_epochs"] * arm.epoch_factor
    assert cfg.trainer.max_epochs == (20 if arm.name.endswith("_e20") else 5)
    assert cfg.quant.prepare.kernel == (kernel or "auto")  # the default back-end
    if "traces_from" in arm.extra:
        assert cfg.callbacks.hessian.traces_path.endswith("mixed_hasb/traces.json")
