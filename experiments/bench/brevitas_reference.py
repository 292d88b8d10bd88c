"""Brevitas QAT models next to P1 and P8 (optional: ``pip install brevitas``, the ``bench`` extra).

The same layers as the LSQ reference are quantized (every ``nn.Conv2d`` / ``nn.Linear`` except the first and the
last): ``brevitas.nn.QuantConv2d`` / ``QuantLinear`` at ``bits`` for the weights (per-tensor scale, initialised from
the weights' statistics and then learned: ``parameter_from_stats``) and the layer input (signed, per-tensor scale, a
learned parameter from the first step: ``parameter``, initialised at :data:`ACT_INIT_MAX`). A learned scale from
the start keeps Brevitas' default activation scaling (percentile statistics collected over the first 300 steps)
out of the timing: that would time a calibration phase, not QAT.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ACT_INIT_MAX", "brevitas_missing", "brevitas_quantize_model"]

#: initial clipping value of the learned input scales (``scale = max / (2^(b-1) - 1)``); timing does not depend on it
ACT_INIT_MAX = 4.0


def brevitas_missing() -> str | None:
    """``None`` when Brevitas imports, else why not (the benchmarks then leave it out and say so)."""
    try:
        import brevitas.nn  # noqa: F401
    except Exception as err:  # noqa: BLE001  any import failure means: not available here
        return f"brevitas not importable ({type(err).__name__}: {err}); install the `bench` extra"
    return None


def _quant_layer(m: nn.Module, bits: int) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat

    common = {
        "weight_quant": Int8WeightPerTensorFloat,
        "weight_bit_width": bits,
        "weight_scaling_impl_type": "parameter_from_stats",
        "input_quant": Int8ActPerTensorFloat,
        "input_bit_width": bits,
        "input_scaling_impl_type": "parameter",
        "input_max_val": ACT_INIT_MAX,
        "input_min_val": -ACT_INIT_MAX,
    }
    if isinstance(m, nn.Conv2d):
        q: nn.Module = qnn.QuantConv2d(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
            groups=m.groups, bias=m.bias is not None, **common,
        )  # fmt: skip
    else:
        assert isinstance(m, nn.Linear)
        q = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, **common)
    q.load_state_dict(m.state_dict(), strict=False)  # weight and bias; the quantizers keep their own init
    return q


def brevitas_quantize_model(model: nn.Module, bits: int, keep_fp: set[str]) -> nn.Module:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` not named in ``keep_fp`` for its Brevitas version, in place.

    Raises:
        RuntimeError: Brevitas is not installed (see :func:`brevitas_missing`).
    """
    missing = brevitas_missing()
    if missing is not None:
        raise RuntimeError(missing)
    for name, m in list(model.named_modules()):
        if name in keep_fp or type(m) not in (nn.Conv2d, nn.Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quant_layer(m, bits))
    return model
