"""Bit-switchable layers made from existing Conv/Linear modules by a class swap.

``make_quant_layer(module, ...)`` changes the class of an existing module in place to a cached subclass of its
own class (``DBQConv2d`` for ``nn.Conv2d``, ``DBQStdConv2d`` for timm's ``StdConv2d``, ...). Parameters, names and
state_dict keys of the original are kept (``conv1.weight`` stays ``conv1.weight``), two submodules are added
(``weight_quant``, ``act_quant``), and the original class's ``forward`` still runs: plain ``nn.Conv*d``/``nn.Linear``
take a fast path with the quantized weight; any other allowed subclass (StdConv2d, Conv2dSame, timm Linear, ...)
runs its own ``forward`` while ``self.weight`` reads the quantized weight. The classes pickle and deep-copy
(needed by ``ddp_spawn`` and ``copy.deepcopy``), unlike ``torch.nn.utils.parametrize``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dbq.quant.quantizers import ActQuantizer, WeightQuantizer
from lightning_dbq.quant.recompute import conv_geometry, recomputable, recomputed_conv
from lightning_dbq.quant.registry import weight_quantizer_class

__all__ = ["DBQLayer", "QuantizedLayer", "is_quant_layer", "iter_quantizers", "make_quant_layer", "quantizable_base"]

_FAST_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CLASS_CACHE: dict[type, type] = {}


def _allowed_types() -> tuple[type, ...]:
    allowed: list[type] = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]
    try:  # timm subclasses whose own forward reads ``self.weight`` (checked by tests on real timm models)
        from timm.layers import (
            Conv2dSame,
            Linear,
            ScaledStdConv2d,
            ScaledStdConv2dSame,
            StdConv2d,
            StdConv2dSame,
        )

        allowed += [Conv2dSame, Linear, StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame]
    except ImportError:  # pragma: no cover - timm is a dependency, but quant/ works without it
        pass
    return tuple(allowed)


def quantizable_base(module: nn.Module) -> str | None:
    """``"fast"`` / ``"swap"`` when ``module`` can be made bit-switchable, ``None`` when it cannot.

    Exact ``nn.Conv{1,2,3}d``/``nn.Linear`` take the fast path; known timm subclasses run their own forward.
    Unknown subclasses (e.g. ``NonDynamicallyQuantizableLinear`` inside ``nn.MultiheadAttention``, whose weight is
    read by the parent, not by its own forward) are not quantized.
    """
    t = type(module)
    if t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        return "fast"
    if t in _allowed_types():
        return "swap"
    return None


class DBQLayer:
    """Mixin for bit-switchable layers (see module docstring). Never instantiated directly."""

    weight: nn.Parameter
    bias: Tensor | None
    weight_quant: WeightQuantizer
    act_quant: ActQuantizer | None
    _dbq_base: type[nn.Module]
    _dbq_fast: bool
    # set by lightning_dbq.fqt.enable_grad_quant: runs the op with a quantized backward (fast path only)
    grad_quant: Callable[[Any, Tensor, Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the input (if enabled), then run the original forward with the quantized weight.

        Plain zero-padded convolutions under autograd run as one node that saves the unquantized input and weight
        and rebuilds the quantized ones in the backward (:mod:`lightning_dbq.quant.recompute`; same values).
        """
        if self._dbq_fast and self.grad_quant is None and recomputable(x, self.weight):
            out = self._recomputed_forward(x)
            if out is not None:
                return out
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight_quant(self.weight)
        if self._dbq_fast:
            if self.grad_quant is not None and torch.is_grad_enabled():
                return self.grad_quant(self, x, w)
            if isinstance(self, _FAST_CONV):
                return self._conv_forward(x, w, self.bias)
            return F.linear(x, w, self.bias)
        # Shadow the Parameter with the quantized tensor for the duration of the original forward: instance
        # __dict__ wins over nn.Module.__getattr__, and _parameters (order, keys) is never touched.
        self.__dict__["weight"] = w
        try:
            return self._dbq_base.forward(self, x)  # type: ignore[arg-type,no-any-return]
        finally:
            del self.__dict__["weight"]

    def _recomputed_forward(self, x: Tensor) -> Tensor | None:
        """:func:`~lightning_dbq.quant.recompute.recomputed_conv` of ``x``, or ``None`` where it does not apply (not
        a plain zero-padded convolution; a quantizer without a pure op, such as binary weights, or with its own
        ``forward``): then nothing has run yet."""
        geometry = conv_geometry(self)  # type: ignore[arg-type]
        aq, wq = self.act_quant, self.weight_quant
        if geometry is None or (aq is not None and type(aq).forward is not ActQuantizer.forward):
            return None
        w_quant = wq.fake_quant_op(self.weight) if wq.enabled else None
        if wq.enabled and w_quant is None:
            return None
        x_quant = aq.fake_quant_op(x) if aq is not None and aq.enabled else None
        return recomputed_conv(x, x_quant, self.weight, w_quant, self.bias, geometry)

    def __reduce_ex__(self, protocol: Any) -> Any:
        state = self.__dict__.copy()
        state.pop("weight", None)
        return (_rebuild, (self._dbq_base,), state)


def _quant_class(base: type) -> type:
    cls = _CLASS_CACHE.get(base)
    if cls is None:
        cls = type(f"DBQ{base.__name__}", (DBQLayer, base), {"__module__": __name__})
        _CLASS_CACHE[base] = cls
    return cls


def _rebuild(base: type[nn.Module]) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = _quant_class(base)
    return obj


def is_quant_layer(module: nn.Module) -> bool:
    """True for modules made bit-switchable by :func:`make_quant_layer`."""
    return isinstance(module, DBQLayer)


class QuantizedLayer(NamedTuple):
    """One quantized layer of a prepared model, as :func:`iter_quantizers` yields it."""

    name: str
    layer: Any  # a DBQLayer (and an nn.Module)
    weight_quant: WeightQuantizer
    act_quant: ActQuantizer | None


def iter_quantizers(model: nn.Module) -> Iterator[QuantizedLayer]:
    """Every quantized layer of ``model`` in registration order: ``(name, layer, weight_quant, act_quant)``.

    The one walk over quantizers (prepare, set_bits, ALRS param groups, artifacts, freeze, search use it); works on
    any module, prepared or not (an unprepared model yields nothing).

    Example:
        >>> for q in iter_quantizers(model):  # doctest: +SKIP
        ...     print(q.name, q.weight_quant.mode, q.weight_quant.active_bits)
    """
    for name, m in model.named_modules():
        if isinstance(m, DBQLayer):
            yield QuantizedLayer(name, m, m.weight_quant, m.act_quant)


def make_quant_layer(
    module: nn.Module,
    bits: Sequence[int],
    per_channel: bool = False,
    quantize_input: bool = True,
    weight_mode: str = "double_round",
    kernel: str = "fused",
) -> nn.Module:
    """Turn ``module`` into a bit-switchable layer in place and return it.

    Args:
        module: a Conv/Linear module accepted by :func:`quantizable_base`.
        bits: candidate bits (already validated).
        per_channel: per-output-channel weight scales.
        quantize_input: add a per-bit activation quantizer on the layer's input.
        weight_mode: a registered mode (:mod:`lightning_dbq.quant.registry`): its weight quantizer class and the
            activation quantizer class that goes with it.
        kernel: fake-quant back-end ``"fused"`` | ``"eager"`` | ``"compile"`` | ``"auto"``
            (:mod:`lightning_dbq.quant.kernels`).

    Raises:
        TypeError: when the module type is not supported.
        ValueError: an unknown ``weight_mode``, or ``bits`` the mode does not accept.
    """
    kind = quantizable_base(module)
    if kind is None:
        raise TypeError(f"cannot quantize module of type {type(module).__name__}; supported: {_allowed_types()}")
    base = type(module)
    weight: Tensor = module.weight  # type: ignore[assignment]
    cls = weight_quantizer_class(weight_mode)
    module.weight_quant = cls(weight, bits, per_channel=per_channel, kernel=kernel)
    module.add_module("act_quant", cls.act_quantizer(bits, kernel=kernel) if quantize_input else None)
    module.__class__ = _quant_class(base)
    object.__setattr__(module, "_dbq_base", base)
    object.__setattr__(module, "_dbq_fast", kind == "fast")
    return module
