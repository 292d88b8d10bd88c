"""Pure-torch quantization core: Double Rounding math, quantizer modules, model preparation, int artifacts.

Nothing here imports lightning, hydra or omegaconf.
"""

from lightning_dbq.quant.artifact import load_int, read_manifest, save_int
from lightning_dbq.quant.artifact_check import ArtifactError
from lightning_dbq.quant.binary import BinaryActQuantizer, BinaryWeightQuantizer
from lightning_dbq.quant.calibrate import calibrate
from lightning_dbq.quant.convert import freeze
from lightning_dbq.quant.factory import create_fp_model, create_model
from lightning_dbq.quant.layers import QuantizedLayer, iter_quantizers
from lightning_dbq.quant.norm import PerBitNorm
from lightning_dbq.quant.prepare import (
    LayerInfo,
    bit_config,
    first_last_layers,
    get_spec,
    prepare,
    quant_enabled,
    quantized_layers,
    set_bits,
    set_kernel,
)
from lightning_dbq.quant.quantizers import (
    ActQuantizer,
    DoubleRoundWeightQuantizer,
    FloorWeightQuantizer,
    UnsharedWeightQuantizer,
    WeightQuantizer,
)
from lightning_dbq.quant.registry import (
    WEIGHT_QUANTIZERS,
    register_weight_quantizer,
    weight_modes,
    weight_quantizer_class,
)
from lightning_dbq.quant.spec import QuantSpec, validate_bits

__all__ = [
    "WEIGHT_QUANTIZERS",
    "ActQuantizer",
    "ArtifactError",
    "BinaryActQuantizer",
    "BinaryWeightQuantizer",
    "DoubleRoundWeightQuantizer",
    "FloorWeightQuantizer",
    "LayerInfo",
    "PerBitNorm",
    "QuantSpec",
    "QuantizedLayer",
    "UnsharedWeightQuantizer",
    "WeightQuantizer",
    "bit_config",
    "calibrate",
    "create_fp_model",
    "create_model",
    "first_last_layers",
    "freeze",
    "get_spec",
    "iter_quantizers",
    "load_int",
    "prepare",
    "quant_enabled",
    "quantized_layers",
    "read_manifest",
    "register_weight_quantizer",
    "save_int",
    "set_bits",
    "set_kernel",
    "validate_bits",
    "weight_modes",
    "weight_quantizer_class",
]
