"""lightning_dbq: train a vision model once, serve it at any bit-width from one stored int8 checkpoint.

Implements "Nearly Lossless Adaptive Bit Switching" (arXiv 2502.01199). The stable public API:

>>> import lightning_dbq as dbq
>>> model = dbq.create_model("cifar_resnet20", bits=[8, 6, 4, 2], num_classes=10)
>>> _ = dbq.set_bits(model, 4)

Importing this package imports neither lightning nor hydra, nor even torch: the public names are loaded from
:mod:`lightning_dbq.quant` on first use, so the command-line tools can validate a config in a second or two
before paying for torch. The Lightning plugin lives in ``lightning_dbq.training``.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; at run time see __getattr__
    from lightning_dbq.export import export_onnx
    from lightning_dbq.quant.artifact import load_int, read_manifest, save_int
    from lightning_dbq.quant.artifact_check import ArtifactError
    from lightning_dbq.quant.calibrate import calibrate
    from lightning_dbq.quant.convert import freeze
    from lightning_dbq.quant.factory import create_model
    from lightning_dbq.quant.prepare import (
        LayerInfo,
        bit_config,
        prepare,
        quant_enabled,
        quantized_layers,
        set_bits,
        set_kernel,
    )
    from lightning_dbq.quant.spec import QuantSpec

try:
    __version__ = version("lightning-dbq")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "ArtifactError",
    "LayerInfo",
    "QuantSpec",
    "__version__",
    "bit_config",
    "calibrate",
    "create_model",
    "export_onnx",
    "freeze",
    "load_int",
    "prepare",
    "quant_enabled",
    "quantized_layers",
    "read_manifest",
    "save_int",
    "set_bits",
    "set_kernel",
]


_EXPORT_NAMES = frozenset({"export_onnx"})


def __getattr__(name: str) -> Any:
    """Load a public name from :mod:`lightning_dbq.quant` (or :mod:`lightning_dbq.export`) on first access
    (PEP 562)."""
    if name in __all__ and name != "__version__":
        module = "lightning_dbq.export" if name in _EXPORT_NAMES else "lightning_dbq.quant"
        value = getattr(import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_dbq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
