"""Config validation before any training starts: every error names the config key at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "get_key", "validate_train_config"]


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted key."""


def get_key(cfg: Any, key: str, default: Any = None) -> Any:
    """The value at dotted ``key`` of a (DictConfig or dict) config, or ``default`` when a part is missing."""
    node = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


_get = get_key


def validate_train_config(cfg: Any) -> None:
    """Check model name, bits, data root/num_classes and option enums.

    Raises:
        ConfigError: naming the key, the bad value and the allowed values.
    """
    import timm

    import lightning_dbq.models  # noqa: F401  (register cifar_resnet*)
    from lightning_dbq.quant.factory import close_model_names
    from lightning_dbq.quant.kernels import DEFAULT_KERNEL, KERNELS
    from lightning_dbq.quant.spec import WEIGHT_MODES, validate_bits
    from lightning_dbq.training.alrs import ALRS_MODES
    from lightning_dbq.training.module import OPTIMIZERS, SCHEDULERS
    from lightning_dbq.training.state import ALGORITHMS

    name = _get(cfg, "model.name")
    if not isinstance(name, str) or not timm.is_model(name):
        close = close_model_names(name) if isinstance(name, str) else []
        hint = f"did you mean {close[0]!r}? (close timm names: {close})" if close else "see timm.list_models()"
        raise ConfigError(f"model.name: unknown model {name!r}; any timm model name is allowed; {hint}")
    try:
        validate_bits(list(_get(cfg, "quant.bits", [])), "quant.bits")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"quant.bits: {e}") from e
    # (key, allowed values, default when the key is absent: None = required)
    for key, allowed, default in (("quant.algorithm", ALGORITHMS, None), ("quant.alrs", ALRS_MODES, None),
                                  ("optim.optimizer", OPTIMIZERS, None), ("optim.scheduler", SCHEDULERS, None),
                                  ("quant.prepare.kernel", KERNELS, DEFAULT_KERNEL),
                                  ("quant.prepare.weight_mode", WEIGHT_MODES, WEIGHT_MODES[0])):  # fmt: skip
        value = _get(cfg, key, default)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}; allowed: {list(allowed)}")
    target = str(_get(cfg, "data._target_", ""))
    downloads = target.endswith("CIFAR10DataModule") and _get(cfg, "data.download", False)
    for key in ("data.root", "data.test_root"):
        root = _get(cfg, key)
        if root is not None and not downloads and not Path(str(root)).exists():
            raise ConfigError(f"{key}: {root!r} does not exist (absolute: {Path(str(root)).resolve()})")
    kw_classes = _get(cfg, "model.kwargs.num_classes")
    if kw_classes is not None:
        raise ConfigError(
            f"model.kwargs.num_classes: set to {kw_classes}, but the number of classes comes from the data module; "
            "remove it"
        )


def check_num_classes(data_classes: int, cfg: Any) -> None:
    """The data's classes must match an explicit ``model.num_classes`` if one is given."""
    explicit = _get(cfg, "model.num_classes")
    if explicit is not None and int(explicit) != int(data_classes):
        raise ConfigError(f"model.num_classes: {explicit} does not match the data's {data_classes} classes")
