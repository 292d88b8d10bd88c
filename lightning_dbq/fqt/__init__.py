"""Fully quantized training (FQT): quantized output gradients in the backward of every bit-switchable layer.

>>> import lightning_dbq as dbq
>>> from lightning_dbq.fqt import GradQuantConfig, enable_grad_quant
>>> model = dbq.create_model("cifar_resnet20", bits=[8, 4], num_classes=10)
>>> names = enable_grad_quant(model, GradQuantConfig(bits=4, method="agp", keep=0.25))

Methods (see :mod:`lightning_dbq.fqt.grad_quant`): ``ptq``, ``psq``, ``bhq``, ``agp`` (unbiased) and ``topk``
(biased, the 1-bit-FQT public code's pruning). Names load lazily (PEP 562): importing this package and
:class:`GradQuantConfig` does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from lightning_dbq.fqt.config import GradQuantConfig
    from lightning_dbq.fqt.enable import LayerGradQuant, enable_grad_quant, grad_quant_config
    from lightning_dbq.fqt.functions import fqt_conv, fqt_linear
    from lightning_dbq.fqt.grad_quant import GRAD_METHODS, GradMethod, register_grad_method
    from lightning_dbq.fqt.stats import GradStats, record_grad_stats

__all__ = [
    "GRAD_METHODS",
    "GradMethod",
    "GradQuantConfig",
    "GradStats",
    "LayerGradQuant",
    "enable_grad_quant",
    "fqt_conv",
    "fqt_linear",
    "grad_quant_config",
    "record_grad_stats",
    "register_grad_method",
]

_WHERE = {
    "GradQuantConfig": "config",
    "LayerGradQuant": "enable",
    "enable_grad_quant": "enable",
    "grad_quant_config": "enable",
    "fqt_conv": "functions",
    "fqt_linear": "functions",
    "GRAD_METHODS": "grad_quant",
    "GradMethod": "grad_quant",
    "register_grad_method": "grad_quant",
    "GradStats": "stats",
    "record_grad_stats": "stats",
}


def __getattr__(name: str) -> Any:
    """Load a public name from its submodule on first access (PEP 562)."""
    if name in _WHERE:
        value = getattr(import_module(f"lightning_dbq.fqt.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_dbq.fqt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
