"""``dbq-train``: Hydra entry point for multi-precision training.

``dbq-train hydra.run.dir=DIR [overrides]`` writes ``DIR/results.json``, ``DIR/model.dbq.safetensors``,
``DIR/per_bit_accuracy.png`` and checkpoints under ``DIR/checkpoints``.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.validate import check_num_classes, validate_train_config

__all__ = ["main", "train"]

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def _instantiate_dict(node: Any) -> list[Any]:
    out = []
    for value in (node or {}).values():
        if value is not None and "_target_" in value:
            out.append(hydra.utils.instantiate(value, _convert_="all"))
    return out


def build_module(cfg: DictConfig, num_classes: int, in_chans: int) -> Any:
    """The DBQModule described by the ``model``, ``quant`` and ``optim`` groups."""
    from lightning_dbq.training.module import DBQModule

    quant = _plain(cfg.quant)
    optim = _plain(cfg.optim)
    return DBQModule(
        model=cfg.model.name,
        num_classes=num_classes,
        in_chans=in_chans,
        model_kwargs=_plain(cfg.model.get("kwargs")) or {},
        init_checkpoint=cfg.model.get("init_checkpoint"),
        bits=quant["bits"],
        quant=quant.get("prepare") or {},
        algorithm=quant["algorithm"],
        alrs=quant["alrs"],
        alrs_act_scales=quant.get("alrs_act_scales", False),
        kd=quant.get("kd", False),
        kd_weight=quant.get("kd_weight", 1.0),
        **optim,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build and fit; returns the final metrics (plain floats)."""
    import lightning.pytorch as pl

    import lightning_dbq.training  # noqa: F401  (registers the dbq strategies)

    validate_train_config(cfg)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning prints itself; avoid duplicate lines
        logging.getLogger(name).propagate = False
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    check_num_classes(datamodule.num_classes, cfg)
    module = build_module(cfg, datamodule.num_classes, datamodule.in_chans)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    for lg in loggers:
        lg.log_hyperparams(_plain(cfg))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            for row in trainer.test(module, datamodule=datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in row.items()})
        return metrics
    finally:
        _finish_wandb()


def _finish_wandb() -> None:
    """Close the W&B run so the next Hydra multirun job starts a new one."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console script ``dbq-train``."""
    metrics = train(cfg)
    value = metrics.get(str(cfg.get("optimized_metric")))
    return value


if __name__ == "__main__":
    main()
