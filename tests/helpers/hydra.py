"""Compose the ``dbq-train`` config in tests, as the CLI would (no Hydra job is started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from lightning_dbq.cli._conf import config_dir

__all__ = ["compose_train"]


def compose_train(overrides: list[str], output_dir: Path | None = None) -> Any:
    """The composed ``train`` config; with ``output_dir``, ``paths.output_dir`` points there and the ``hydra`` node is
    dropped (what :func:`lightning_dbq.cli.train.train` expects outside a Hydra job)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=output_dir is not None)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            del cfg["hydra"]
    return cfg
