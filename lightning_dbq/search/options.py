"""Allowed values and registries of the serving tools (``dbq-search``, ``dbq-export``, ``dbq-eval``), torch-free.

The command-line validation (:mod:`lightning_dbq.cli.schema`) reads these before torch is imported, so the
registries map a name to an ``"module:function"`` string that is imported only when used.

Extension points: :func:`register_export_format` (a writer ``fn(model, config, path, *, example_input, onnx_mode,
preprocessing, class_names, calibration) -> Path``, see :mod:`lightning_dbq.search.serving`) and
:func:`register_runtime` (a factory ``fn(model, config, example_input, *, onnx_mode, threads, workdir, calibration)
-> predict``, see
:mod:`lightning_dbq.search.bench`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_MODES",
    "RUNTIMES",
    "SEARCH_COSTS",
    "SEARCH_METHODS",
    "register_export_format",
    "register_runtime",
    "resolve",
]

SEARCH_METHODS = ("dp", "ilp")
SEARCH_COSTS = ("hawq", "paper")
ONNX_MODES = ("exact", "integer")  # lightning_dbq.export.onnx.EXPORT_MODES (a test keeps them equal)

#: ``dbq-export format=NAME`` -> ``"module:function"`` of its writer
EXPORT_FORMATS: dict[str, str] = {
    "onnx": "lightning_dbq.search.serving:write_onnx",
    "torchscript": "lightning_dbq.search.serving:write_torchscript",
    "dbq": "lightning_dbq.search.serving:write_dbq",
}

#: file suffix of each export format's default output name
EXPORT_SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "dbq": ".dbq.safetensors"}

#: ``dbq-eval runtime=NAME`` -> ``"module:function"`` of its runner factory
RUNTIMES: dict[str, str] = {
    "torch": "lightning_dbq.search.bench:torch_runner",
    "onnx": "lightning_dbq.search.bench:onnx_runner",
}


def _register(registry: dict[str, str], kind: str, name: str, target: str) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if target.count(":") != 1:
        raise ValueError(f"{kind} {name!r}: target must be 'module:function', got {target!r}")
    registry[name] = target


def register_export_format(name: str, target: str, suffix: str) -> None:
    """Add (or replace) a ``dbq-export`` format.

    Args:
        name: the value of ``format=``.
        target: ``"module:function"`` of the writer (imported when used).
        suffix: the default output file's suffix (e.g. ``".onnx"``).

    Raises:
        ValueError: an empty name or a target that is not ``module:function``.
    """
    _register(EXPORT_FORMATS, "export format", name, target)
    EXPORT_SUFFIXES[name] = suffix


def register_runtime(name: str, target: str) -> None:
    """Add (or replace) a ``dbq-eval`` runtime (``"module:function"`` of its runner factory).

    Raises:
        ValueError: an empty name or a target that is not ``module:function``.
    """
    _register(RUNTIMES, "runtime", name, target)


def resolve(registry: dict[str, str], name: str, field: str) -> Any:
    """Import the function registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message names ``field`` and the allowed values).
    """
    if name not in registry:
        raise ValueError(f"{field}: got {name!r}; allowed: {list(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)
