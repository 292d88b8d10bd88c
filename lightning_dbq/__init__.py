"""lightning_dbq: train a vision model once, serve it at any bit-width from one stored int8 checkpoint.

Implements "Nearly Lossless Adaptive Bit Switching" (arXiv 2502.01199). The stable public API:

>>> import lightning_dbq as dbq
>>> model = dbq.create_model("cifar_resnet20", bits=[8, 6, 4, 2], num_classes=10)
>>> _ = dbq.set_bits(model, 4)

Importing this package imports neither lightning nor hydra; the Lightning plugin lives in
``lightning_dbq.training``.
"""

from importlib.metadata import PackageNotFoundError, version

from lightning_dbq.quant import (
    LayerInfo,
    QuantSpec,
    bit_config,
    create_model,
    load_int,
    prepare,
    quant_enabled,
    quantized_layers,
    read_manifest,
    save_int,
    set_bits,
    set_kernel,
)

try:
    __version__ = version("lightning-dbq")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "LayerInfo",
    "QuantSpec",
    "__version__",
    "bit_config",
    "create_model",
    "load_int",
    "prepare",
    "quant_enabled",
    "quantized_layers",
    "read_manifest",
    "save_int",
    "set_bits",
    "set_kernel",
]
