"""Export a frozen configuration of a Double Rounding model to deployment formats.

``from lightning_dbq.export import export_onnx`` (needs the ``onnx`` extra: ``pip install 'lightning-dbq[onnx]'``).
The ONNX module is imported lazily, so importing this package never imports ``onnx`` or ``onnxruntime``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from lightning_dbq.export.onnx import EXPORT_MODES, OnnxActQuant, export_onnx

__all__ = ["EXPORT_MODES", "OnnxActQuant", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("lightning_dbq.export.onnx"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
