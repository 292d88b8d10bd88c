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
from lightning_dbq.fqt.options import GRAD_METHOD_NAMES, MAX_GRAD_BITS, MIN_GRAD_BITS, PRUNING_METHODS
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
from lightning_dbq.search.options import EXPORT_FORMATS, ONNX_MODES, RUNTIMES, SEARCH_COSTS, SEARCH_METHODS

__all__ = [
    "check_config_types",
    "check_eval_config",
    "check_export_config",
    "check_search_config",
    "parse_config_ref",
]

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
    "optim.latent_lr": _optional(_num(0.0, lo_open=True)),
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
    "quant.weight_mode": _optional(_enum(WEIGHT_MODES)),
    "quant.prepare.weight_mode": _enum(WEIGHT_MODES),
    "quant.prepare.per_channel": _BOOL,
    "quant.prepare.quantize_first": _BOOL,
    "quant.prepare.quantize_last": _BOOL,
    "quant.prepare.quantize_acts": _BOOL,
    "quant.grad.bits": _int(MIN_GRAD_BITS, MAX_GRAD_BITS),
    "quant.grad.method": _optional(_enum(GRAD_METHOD_NAMES)),
    "quant.grad.keep": _num(0.0, 1.0, lo_open=True, hi_open=False),
    "quant.grad.scq": _BOOL,
    "quant.grad.seed": _int(0, 2**63 - 1),
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
        if not (MIN_BITS <= b <= MAX_BITS or items == [1]):  # [1]: quant.prepare.weight_mode=binary
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


def _check_grad(cfg: Any) -> None:
    method, keep = get_key(cfg, "quant.grad.method", None), get_key(cfg, "quant.grad.keep", 1.0)
    if _is_num(keep) and keep < 1 and method is not None and method not in PRUNING_METHODS:
        raise ConfigError(
            f"quant.grad.keep: got {keep} with quant.grad.method={method}; keep < 1 needs a pruning method "
            f"{list(PRUNING_METHODS)} (the other methods keep every group: use keep=1.0)"
        )


def _check_rules(cfg: Any, rules: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    for key, (ok, allowed) in rules.items():
        value = get_key(cfg, key, _MISSING)
        if value is _MISSING:
            continue
        if not ok(value):
            kind = "" if allowed.startswith("[") else f" ({type(value).__name__})"
            raise ConfigError(f"{key}: got {value!r}{kind}; allowed: {allowed}")


def check_config_types(cfg: Any) -> None:
    """Check every known key's type and range (see :data:`RULES`) and ``quant.bits``; no heavy imports.

    Raises:
        ConfigError: naming the key, the value, its type and the allowed values.
    """
    _check_bits(get_key(cfg, "quant.bits", []))
    _check_rules(cfg, RULES)
    _check_grad(cfg)
    _check_paths(cfg)


_PATH = ((lambda v: isinstance(v, str) and bool(v)), "a file path (a non-empty string)")
_BITS = _int(MIN_BITS, MAX_BITS)

# keys of dbq-search / dbq-export / dbq-eval (the shared ones, seed, cpu_threads, data.*, come from RULES)
SEARCH_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "checkpoint": _PATH,
    "traces": _optional(_PATH),
    "budgets": _optional(
        (
            (lambda v: _is_list(v) and len(v) > 0 and all(_is_num(b) and MIN_BITS <= b <= MAX_BITS for b in v)),
            f"a non-empty list of average-bit budgets in [{MIN_BITS}, {MAX_BITS}]",
        )
    ),
    "method": _enum(SEARCH_METHODS),
    "cost": _enum(SEARCH_COSTS),
    "max_bops": _optional(_num(0.0, lo_open=True)),
    "enumerate_alg2": _BOOL,
    "hessian.num_images": _int(1),
    "hessian.batch_size": _int(1),
    "hessian.min_samples": _int(1),
    "hessian.max_samples": _int(1),
    "hessian.rel_tol": _num(0.0, lo_open=True),
}
EXPORT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "checkpoint": _PATH,
    "bits": _optional(_BITS),
    "config": _optional(((lambda v: isinstance(v, str) and bool(v)), "PATH#ROW, e.g. pareto.json#3")),
    "format": _enum(tuple(EXPORT_FORMATS)),
    "onnx_mode": _enum(ONNX_MODES),
    "output": _optional(_PATH),
    "calibration_images": _int(1),
}
EVAL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "checkpoint": _PATH,
    "pareto": _optional(_PATH),
    "bits": _optional(
        (
            (lambda v: _BITS[0](v) or (_is_list(v) and len(v) > 0 and all(_BITS[0](b) for b in v))),
            f"null, or a non-empty list of bit-widths in [{MIN_BITS}, {MAX_BITS}], e.g. [8,4]",
        )
    ),
    "runtime": _enum(tuple(RUNTIMES)),
    "onnx_mode": _enum(ONNX_MODES),
    "max_images": _optional(_int(1)),
    "calibration_images": _int(1),
    "latency.batch_size": _int(1, 1 << 16),
    "latency.warmup": _int(0),
    "latency.batches": _int(1),
}


def _is_list(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def _check_file(cfg: Any, key: str, required: bool = False) -> None:
    value = get_key(cfg, key)
    if value is None and required:
        raise ConfigError(f"{key}: missing; give {key}=PATH (an int artifact *.dbq.safetensors or a DBQModule .ckpt)")
    if value is not None and not Path(str(value)).is_file():
        raise ConfigError(f"{key}: {str(value)!r} does not exist (absolute: {Path(str(value)).resolve()})")


def parse_config_ref(value: str, field: str = "config") -> tuple[Path, int]:
    """``PATH#ROW`` (or ``PATH@ROW``, which needs no quoting on a Hydra command line) as ``(path, row)``.

    Raises:
        ConfigError: not ``PATH#ROW`` with a non-negative integer row, or no such file (naming ``field``).
    """
    sep = max(value.rfind("#"), value.rfind("@"))
    path, row = (value[:sep], value[sep + 1 :]) if sep > 0 else (value, "")
    if not row.isdigit():
        raise ConfigError(
            f"{field}: got {value!r}; expected PATH#ROW, a pareto.json written by dbq-search and a row index "
            "(0 = the fewest bits), e.g. 'pareto.json#3' (quoted for Hydra) or pareto.json@3"
        )
    if not Path(path).is_file():
        raise ConfigError(f"{field}: {path!r} does not exist (absolute: {Path(path).resolve()})")
    return Path(path), int(row)


def check_search_config(cfg: Any) -> None:
    """Types and ranges of a ``dbq-search`` config (see :data:`SEARCH_RULES`); no heavy imports.

    Raises:
        ConfigError: naming the key, the value and the allowed values; a missing checkpoint or traces file.
    """
    _check_rules(cfg, RULES)
    _check_rules(cfg, SEARCH_RULES)
    if get_key(cfg, "method") == "dp" and get_key(cfg, "max_bops") is not None:
        raise ConfigError("max_bops: needs method=ilp (the dp front has no BOPs cap)")
    lo, hi = get_key(cfg, "hessian.min_samples", 1), get_key(cfg, "hessian.max_samples", 1)
    if lo > hi:
        raise ConfigError(f"hessian.min_samples: {lo} exceeds hessian.max_samples ({hi})")
    _check_file(cfg, "checkpoint", required=True)
    _check_file(cfg, "traces")


def check_export_config(cfg: Any) -> None:
    """Types and ranges of a ``dbq-export`` config (see :data:`EXPORT_RULES`); no heavy imports.

    Exactly one of ``bits`` and ``config`` must be given; ``config`` must be ``PATH#ROW`` of an existing file.

    Raises:
        ConfigError: naming the key, the value and the allowed values.
    """
    _check_rules(cfg, RULES)
    _check_rules(cfg, EXPORT_RULES)
    bits, config = get_key(cfg, "bits"), get_key(cfg, "config")
    if (bits is None) == (config is None):
        got = "both" if bits is not None else "neither"
        raise ConfigError(
            f"bits, config: give exactly one of bits=B (a uniform bit-width) or config=PATH#ROW (a row of a "
            f"pareto.json); got {got}"
        )
    if config is not None:
        parse_config_ref(str(config))
    _check_file(cfg, "checkpoint", required=True)


def check_eval_config(cfg: Any) -> None:
    """Types and ranges of a ``dbq-eval`` config (see :data:`EVAL_RULES`); no heavy imports.

    Raises:
        ConfigError: naming the key, the value and the allowed values; a missing checkpoint or pareto file;
            ``data.test_root`` with a data module that has no separate test tree.
    """
    _check_rules(cfg, RULES)
    _check_rules(cfg, EVAL_RULES)
    _check_file(cfg, "checkpoint", required=True)
    _check_file(cfg, "pareto")
    target = str(get_key(cfg, "data._target_", ""))
    if get_key(cfg, "data.test_root") is not None and not target.endswith("ImageFolderDataModule"):
        raise ConfigError(f"data.test_root: only data=imagefolder reads a separate test tree (data is {target}); "
                          "cifar10 tests on its official test batches (data.official_test=true), digits and "
                          "synthetic on their validation split")  # fmt: skip
