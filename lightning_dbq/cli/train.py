"""``dbq-train``: Hydra entry point for multi-precision training.

``dbq-train hydra.run.dir=DIR [overrides]`` writes ``DIR/results.json``, ``DIR/model.dbq.safetensors``,
``DIR/per_bit_accuracy.png``, checkpoints under ``DIR/checkpoints`` and the run's log, ``DIR/train.log`` (Hydra's
job log: lightning_dbq's and Lightning's INFO lines, ending with the per-bit accuracies).

W&B runs (``logger=wandb``) are grouped by bit list (``bits-8-6-4-2``) and named after it plus the job's Hydra
override dirname (see :func:`wandb_run_names`); ``logger.wandb.name`` / ``logger.wandb.group`` override both.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.schema import check_config_types
from lightning_dbq.cli.validate import ConfigError, check_num_classes, validate_train_config
from lightning_dbq.options import WEIGHT_MODES

__all__ = ["main", "resolve_weight_mode", "train", "wandb_run_names"]

log = logging.getLogger("lightning_dbq.cli.train")  # not __name__, which is "__main__" under `python -m`


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def route_lightning_logs() -> None:
    """Send Lightning's log records through the root logger, i.e. to Hydra's console and ``train.log`` handlers.

    Lightning installs its own stderr handlers (on ``lightning``, and on ``lightning.pytorch`` / ``lightning.fabric``
    when imported before logging is configured, with propagation off there). When the root logger has handlers
    (Hydra's job logging), those stream handlers are removed and propagation is on, so every Lightning line is
    written once, to the console and to ``train.log``.
    """
    if not logging.getLogger().handlers:  # no logging configured (plain Python): keep Lightning's own handlers
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(handler)
        lg.propagate = True


def wandb_run_names(cfg: DictConfig) -> tuple[str, str]:
    """Derived W&B ``(name, group)`` of a training run.

    The group is the bit list, highest first (``bits-8-6-4-2``), so all runs of one bit list compare side by side.
    The name is the group followed by the job's Hydra ``override_dirname`` (the command-line overrides, minus the
    keys in ``hydra.job.config.override_dirname.exclude_keys``: ``quant.bits`` and the logger keys), e.g.
    ``bits-8-6-4-2_optim.lr=0.001,seed=1``; just the group outside a Hydra job or without other overrides.
    """
    group = "bits-" + "-".join(str(b) for b in sorted((int(b) for b in cfg.quant.bits), reverse=True))
    dirname = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return (f"{group}_{dirname}" if dirname else group), group


def _name_wandb_run(cfg: DictConfig) -> None:
    """Fill ``logger.wandb.name`` / ``logger.wandb.group`` from :func:`wandb_run_names` unless the user set them."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return
    name, group = wandb_run_names(cfg)
    with open_dict(node):
        if not node.get("name"):
            node.name = name
        if not node.get("group"):
            node.group = group


def _log_final_accuracy(metrics: dict[str, float]) -> None:
    accs = {k[len("val/acc_") :]: v for k, v in metrics.items() if k.startswith("val/acc_")}
    if accs:
        log.info("final val accuracy per bit-width: %s", ", ".join(f"{k} {100 * v:.2f} %" for k, v in accs.items()))


def _instantiate_dict(node: Any) -> list[Any]:
    out = []
    for value in (node or {}).values():
        if value is not None and "_target_" in value:
            out.append(hydra.utils.instantiate(value, _convert_="all"))
    return out


def resolve_weight_mode(cfg: DictConfig) -> None:
    """Apply the shorthand ``quant.weight_mode`` to ``quant.prepare.weight_mode`` (in place).

    ``quant.weight_mode=binary`` is the same as ``quant.prepare.weight_mode=binary``; null (the default) leaves
    ``quant.prepare`` alone.

    Raises:
        ConfigError: both keys set to different non-default modes.
    """
    mode = cfg.quant.get("weight_mode")
    if mode is None:
        return
    prepare = cfg.quant.get("prepare") or {}
    current = prepare.get("weight_mode")
    if current not in (None, WEIGHT_MODES[0], mode):  # WEIGHT_MODES[0]: the default mode
        raise ConfigError(
            f"quant.weight_mode: got {mode!r} but quant.prepare.weight_mode is {current!r}; set one of the two "
            "(quant.weight_mode is a shorthand for quant.prepare.weight_mode)"
        )
    with open_dict(cfg):
        if cfg.quant.get("prepare") is None:
            cfg.quant.prepare = {}
        cfg.quant.prepare.weight_mode = mode


def _log_latent_lr(cfg: DictConfig) -> None:
    """Log the latent-weight learning rate of a mode with a floor (binary), and warn when it is set below the floor."""
    from lightning_dbq.quant.registry import weight_quantizer_class

    mode = (cfg.quant.get("prepare") or {}).get("weight_mode") or WEIGHT_MODES[0]
    floor = weight_quantizer_class(mode).min_useful_lr
    if floor is None:
        return
    lr = float(cfg.optim.lr)
    latent = cfg.optim.get("latent_lr")
    if latent is None:
        log.info("dbq-train: weight_mode=%s latent weights train at lr %g = max(optim.lr, %g) (optim.latent_lr sets "
                 "it)", mode, max(lr, floor), floor)  # fmt: skip
    elif float(latent) < floor:
        log.warning(
            "dbq-train: weight_mode=%s with optim.latent_lr=%g (< %g): this mode's weights only change where a "
            "latent weight crosses a threshold, which takes many steps at this rate (binary on digits, 12 epochs: "
            "19 %% val at lr 5e-4 with exact gradients); consider optim.latent_lr=null (%g)",
            mode,
            float(latent),
            floor,
            floor,
        )


def grad_quant_options(cfg: DictConfig) -> dict[str, Any] | None:
    """``quant.grad`` as :class:`~lightning_dbq.fqt.GradQuantConfig` fields, or ``None`` when ``quant.grad.method``
    is null (the default: exact gradients).

    Setting a method switches gradient quantization on; the generators are seeded from the run's ``seed`` unless
    ``quant.grad.seed`` is given.
    """
    grad = _plain(cfg.quant.get("grad")) or {}
    if grad.get("method") is None:
        return None
    return {"seed": int(cfg.get("seed", 0)), **grad}


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
        nonfinite=quant.get("nonfinite", "stop"),
        grad_quant=grad_quant_options(cfg),
        **optim,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build and fit; returns the final metrics (plain floats)."""
    check_config_types(cfg)  # types and ranges first: seconds, before torch/Lightning are imported
    resolve_weight_mode(cfg)
    import lightning.pytorch as pl
    import torch

    import lightning_dbq.training  # noqa: F401  (registers the dbq strategies)

    route_lightning_logs()
    validate_train_config(cfg)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    log.info("dbq-train: model %s, bits %s, data %s", cfg.model.name, list(cfg.quant.bits), cfg.data.get("_target_"))
    _log_latent_lr(cfg)
    if grad_quant_options(cfg) is not None:
        log.info("dbq-train: fully quantized training, gradients %s", grad_quant_options(cfg))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    check_num_classes(datamodule.num_classes, cfg)
    module = build_module(cfg, datamodule.num_classes, datamodule.in_chans)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    _name_wandb_run(cfg)
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
        _log_final_accuracy(metrics)
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
