"""Type and range checks of a composed config, before anything heavy is imported (no torch, no Lightning).

``dbq-train quant.bits=8`` or ``trainer.max_epochs=abc`` must fail in seconds with a :class:`ConfigError` naming the
key, the value and what is allowed — not minutes later as a Python ``TypeError`` from deep inside a library. The
checks that need torch or timm (registered model names, data roots' contents) run afterwards in
:func:`lightning_dbq.cli.validate.validate_train_config`.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_dbq.cli.validate import ConfigError, get_key
from lightning_dbq.options import (
    ALGORITHMS,
    ALRS_MODES,
    KERNELS,
    MAX_BITS,
    MIN_BITS,
    NONFINITE,
    OPTIMIZERS,
    SCHEDULERS,
    WEIGHT_MODES,
)

__all__ = ["check_config_types"]

_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _int(lo: int, hi: int | None = None) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi)  # noqa: E731
    return ok, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")


def _num(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = True) -> tuple[Any, str]:
    def ok(v: Any) -> bool:
        if not _is_num(v):
            return False
        x = float(v)
        return (x > lo if lo_open else x >= lo) and (hi is None or (x < hi if hi_open else x <= hi))

    lo_s = "(" if lo_open else "["
    hi_s = "inf)" if hi is None else (f"{hi})" if hi_open else f"{hi}]")
    return ok, f"a finite number in {lo_s}{lo}, {hi_s}"


def _enum(values: Sequence[str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in values), str(list(values))


def _optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or rule[0](v)), f"null or {rule[1]}"


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")

# key -> (check, description); a key absent from the config is not checked here
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _int(0, 2**32 - 1),
    "cpu_threads": _optional(_int(1, 1024)),
    "test": _BOOL,
    "trainer.max_epochs": ((lambda v: _is_int(v) and (v >= 1 or v == -1)), "an integer >= 1 (or -1: no limit)"),
    "trainer.min_epochs": _optional(_int(0)),
    "trainer.devices": (
        (
            lambda v: (
                v == "auto"
                or (_is_int(v) and v >= 1)
                or (isinstance(v, Sequence) and not isinstance(v, str) and all(_is_int(d) for d in v))
            )
        ),
        "'auto', an integer >= 1 or a list of device indices",
    ),  # fmt: skip
    "trainer.check_val_every_n_epoch": _optional(_int(1)),
    "trainer.log_every_n_steps": _int(1),
    "trainer.gradient_clip_val": _optional(_num(0.0, lo_open=True)),
    "trainer.limit_train_batches": _optional(_num(0.0, lo_open=True)),
    "trainer.limit_val_batches": _optional(_num(0.0)),
    "optim.optimizer": _enum(OPTIMIZERS),
    "optim.scheduler": _enum(SCHEDULERS),
    "optim.lr": _num(0.0, lo_open=True),
    "optim.scale_lr": _optional(_num(0.0)),
    "optim.weight_decay": _num(0.0),
    "optim.momentum": _num(0.0, 1.0),
    "optim.label_smoothing": _num(0.0, 1.0),
    "quant.algorithm": _enum(ALGORITHMS),
    "quant.alrs": _enum(ALRS_MODES),
    "quant.alrs_act_scales": _BOOL,
    "quant.kd": _BOOL,
    "quant.kd_weight": _num(0.0),
    "quant.nonfinite": _enum(NONFINITE),
    "quant.prepare.kernel": _enum(KERNELS),
    "quant.prepare.weight_mode": _enum(WEIGHT_MODES),
    "quant.prepare.per_channel": _BOOL,
    "quant.prepare.quantize_first": _BOOL,
    "quant.prepare.quantize_last": _BOOL,
    "quant.prepare.quantize_acts": _BOOL,
    "data.batch_size": _int(1, 1 << 20),
    "data.image_size": _int(8, 4096),
    "data.num_workers": _int(0, 256),
    "data.val_fraction": _num(0.0, 1.0, lo_open=True),
    "data.val_per_class": _optional(_int(1)),
    "data.in_chans": _enum((1, 3)),  # type: ignore[arg-type]
    "model.name": ((lambda v: isinstance(v, str) and bool(v)), "a timm model name (a non-empty string)"),
    "model.num_classes": _optional(_int(1, 100_000)),
}


def _check_bits(value: Any) -> None:
    allowed = f"a list of distinct integers in [{MIN_BITS}, {MAX_BITS}], e.g. [8,6,4,2]"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"quant.bits: got {value!r} ({type(value).__name__}); allowed: {allowed}")
    items = list(value)
    if not items:
        raise ConfigError(f"quant.bits: must not be empty; allowed: {allowed}")
    for b in items:
        if not _is_int(b):
            raise ConfigError(f"quant.bits: got {b!r} ({type(b).__name__}) in {items!r}; allowed: {allowed}")
        if not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError(f"quant.bits: got {b} in {items!r}, outside [{MIN_BITS}, {MAX_BITS}]; allowed: {allowed}")
    if len(set(items)) != len(items):
        raise ConfigError(f"quant.bits: {items!r} has duplicates; allowed: {allowed}")


def _check_paths(cfg: Any) -> None:
    ckpt = get_key(cfg, "ckpt_path")
    if ckpt is None:
        return
    path = Path(str(ckpt))
    if not path.is_file():
        raise ConfigError(f"ckpt_path: {str(ckpt)!r} is not a file (absolute: {path.resolve()})")
    if path.name.endswith(".safetensors"):
        raise ConfigError(
            f"ckpt_path: {str(ckpt)!r} is an int artifact (safetensors); ckpt_path resumes a Lightning .ckpt. "
            "Serve artifacts with lightning_dbq.load_int, or start from one with model.init_checkpoint"
        )
    if path.stat().st_size == 0:
        raise ConfigError(f"ckpt_path: {str(ckpt)!r} is an empty file")
    if not zipfile.is_zipfile(path):  # torch.save (and so every Lightning checkpoint) writes a zip archive
        raise ConfigError(f"ckpt_path: {str(ckpt)!r} is not a torch/Lightning checkpoint (not a torch.save zip "
                          "archive): truncated, or another kind of file")  # fmt: skip


def check_config_types(cfg: Any) -> None:
    """Check every known key's type and range (see :data:`RULES`) and ``quant.bits``; no heavy imports.

    Raises:
        ConfigError: naming the key, the value, its type and the allowed values.
    """
    _check_bits(get_key(cfg, "quant.bits", []))
    for key, (ok, allowed) in RULES.items():
        value = get_key(cfg, key, _MISSING)
        if value is _MISSING:
            continue
        if not ok(value):
            kind = "" if allowed.startswith("[") else f" ({type(value).__name__})"
            raise ConfigError(f"{key}: got {value!r}{kind}; allowed: {allowed}")
    _check_paths(cfg)
