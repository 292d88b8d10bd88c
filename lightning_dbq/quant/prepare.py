"""Turn any timm model (or plain ``nn.Module``) into a bit-switchable one, and switch it.

>>> import timm, lightning_dbq as dbq
>>> model = dbq.prepare(timm.create_model("resnet18", num_classes=10), bits=[8, 6, 4, 2])
>>> dbq.set_bits(model, 4)                      # every quantized layer at w4a4
>>> dbq.set_bits(model, {"layer1.0.conv1": 2})  # one layer at 2 bits, the others unchanged
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_dbq.quant.kernels import DEFAULT_KERNEL, check_kernel
from lightning_dbq.quant.layers import QuantizedLayer, iter_quantizers, make_quant_layer, quantizable_base
from lightning_dbq.quant.norm import PerBitNorm, TransitionalNorm
from lightning_dbq.quant.spec import QuantSpec, validate_bits

__all__ = [
    "LayerInfo",
    "bit_config",
    "first_last_layers",
    "get_spec",
    "prepare",
    "quant_enabled",
    "quantized_layers",
    "set_bits",
    "set_kernel",
]

log = logging.getLogger(__name__)
_SPEC_ATTR = "_dbq_spec"


@dataclass(frozen=True)
class LayerInfo:
    """One quantized layer: its name (relative to the prepared model), parameter count and candidate bits."""

    name: str
    params: int
    bits: tuple[int, ...]
    kind: str


def _as_tuple(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(str(x) for x in v)


def _weight_layers(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]


def first_last_layers(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the first and last (classifier) weight layers.

    timm models: ``pretrained_cfg['first_conv']`` and ``['classifier']`` (either may be a tuple; a name may point
    at a container, in which case every weight layer inside it counts). Other models: the first and the last
    Conv/Linear in registration order.
    """
    layers = _weight_layers(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    first_names, last_names = _as_tuple(cfg.get("first_conv")), _as_tuple(cfg.get("classifier"))

    def expand(names: tuple[str, ...]) -> set[str]:
        out: set[str] = set()
        for n in names:
            out.update(x for x in layers if x == n or x.startswith(n + "."))
        return out

    first, last = expand(first_names), expand(last_names)
    if not first and layers:
        first = {layers[0]}
    if not last and layers:
        last = {layers[-1]}
    return first, last


def get_spec(model: nn.Module) -> QuantSpec:
    """The :class:`QuantSpec` a model was prepared with.

    Raises:
        ValueError: the model was not prepared.
    """
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        raise ValueError("model is not prepared for bit switching; call lightning_dbq.prepare(model, bits=...) first")
    return spec  # type: ignore[no-any-return]


def prepare(
    model: nn.Module,
    bits: Sequence[int] = (8, 6, 4, 2),
    *,
    per_channel: bool = False,
    quantize_first: bool = False,
    quantize_last: bool = False,
    quantize_acts: bool = True,
    per_bit_norm: bool = True,
    skip: Sequence[str] = (),
    transitional_norm: bool = False,
    weight_mode: str = "double_round",
    kernel: str = DEFAULT_KERNEL,
) -> nn.Module:
    """Make ``model`` bit-switchable in place (and return it). Idempotent.

    Conv1d/2d/3d (incl. depthwise/grouped), Linear, and timm's StdConv2d / ScaledStdConv2d / Conv2dSame /
    ``timm.layers.Linear`` get a Double Rounding weight quantizer and a per-bit activation quantizer, keeping
    their own forward and parameter names. Every BatchNorm (incl. timm ``BatchNormAct2d``) that follows a
    quantized layer in registration order becomes a :class:`PerBitNorm` owned by that layer. First and last
    layers stay floating point unless asked.

    Args:
        model: a timm model or any ``nn.Module``.
        bits: candidate bits in ``[2, 8]``, distinct; ``max(bits)`` is the stored precision (``[1]`` for
            ``weight_mode="binary"``, which has that one precision only).
        per_channel: per-output-channel weight scales (default per tensor).
        quantize_first: quantize the first layer too.
        quantize_last: quantize the classifier too.
        quantize_acts: quantize the inputs of quantized layers.
        per_bit_norm: give each candidate bit its own BatchNorm.
        skip: fnmatch patterns (e.g. ``"*.downsample.*"``) of layer names to keep floating point.
        transitional_norm: mixed precision: each norm has a copy per (previous quantized layer's bits, owner's
            bits) instead of per bit (:class:`~lightning_dbq.quant.norm.TransitionalNorm`).
        weight_mode: ``"double_round"`` (the method), the baselines ``"floor"`` / ``"unshared"``, ``"binary"``
            (XNOR-style 1-bit weights and binary activations, ``bits=[1]``), or any mode registered with
            :func:`~lightning_dbq.quant.registry.register_weight_quantizer`.
        kernel: fake-quant back-end (a run-time choice, not part of the spec; see :func:`set_kernel`).

    Returns:
        The same model object.

    Raises:
        ValueError: invalid bits (or bits the weight mode does not accept: ``"binary"`` needs exactly ``[1]``, the
            others bits in ``[2, 8]``), an unknown weight mode, the model was already prepared with a different spec,
            or nothing is left to quantize.
    """
    if isinstance(skip, (str, bytes)):
        raise TypeError(f"prepare(skip=...) must be a list of layer-name patterns, got the string {skip!r}; "
                        f"use skip=[{skip!r}]")  # fmt: skip
    spec = QuantSpec(
        bits=validate_bits(bits),
        per_channel=per_channel,
        quantize_first=quantize_first,
        quantize_last=quantize_last,
        quantize_acts=quantize_acts,
        per_bit_norm=per_bit_norm,
        skip=tuple(skip),
        transitional_norm=transitional_norm,
        weight_mode=weight_mode,
    )
    if transitional_norm and not per_bit_norm:
        raise ValueError("transitional_norm=True needs per_bit_norm=True")
    check_kernel(kernel)
    existing = getattr(model, _SPEC_ATTR, None)
    if existing is not None:
        if existing != spec:
            raise ValueError(f"model was already prepared with {existing}; refusing to re-prepare with {spec}")
        return set_kernel(model, kernel)
    first, last = first_last_layers(model)
    targets: list[str] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if name in first and not quantize_first or name in last and not quantize_last:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in spec.skip):
            continue
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            (targets if quantizable_base(module) else unsupported).append(name)
    if not targets:
        raise ValueError(
            "prepare(): no quantizable layer found (first/last layers are kept FP by default; "
            "pass quantize_first=True / quantize_last=True or loosen `skip`)"
        )
    if unsupported:
        log.warning("prepare(): %d layer(s) of unsupported subclasses kept in FP: %s", len(unsupported), unsupported)
    target_set = set(targets)
    owners: dict[str, str] = {}
    last_weight: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            last_weight = name
        elif per_bit_norm and isinstance(module, _BatchNorm) and last_weight in target_set:
            owners[name] = last_weight  # type: ignore[assignment]
    for name in targets:
        make_quant_layer(
            model.get_submodule(name), spec.bits, per_channel=per_channel, quantize_input=quantize_acts,
            weight_mode=weight_mode, kernel=kernel,
        )  # fmt: skip
    order = {n: i for i, n in enumerate(targets)}
    for name, owner in owners.items():
        norm = model.get_submodule(name)
        if transitional_norm:
            prev = targets[order[owner] - 1] if order[owner] > 0 else ""
            _replace(model, name, TransitionalNorm(norm, spec.bits, owner=owner, prev=prev))
        else:
            _replace(model, name, PerBitNorm(norm, spec.bits, owner=owner))
    setattr(model, _SPEC_ATTR, spec)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _quant_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {q.name: q for q in iter_quantizers(model)}


def quantized_layers(model: nn.Module) -> list[LayerInfo]:
    """The quantized layers in registration order (name, weight parameter count, candidate bits, class)."""
    get_spec(model)
    return [
        LayerInfo(q.name, q.layer.weight.numel(), q.weight_quant.bits, q.layer._dbq_base.__name__)
        for q in iter_quantizers(model)
    ]


def set_bits(model: nn.Module, bits: int | Mapping[str, int]) -> nn.Module:
    """Switch the active precision: one ``int`` for every quantized layer, or ``{layer_name: bits}``.

    A mapping may name a subset of layers; the others keep their bits. Each :class:`PerBitNorm` follows the bits
    of the layer that owns it. Switching only sets integers (no weight is recomputed).

    Raises:
        ValueError: unknown layer name, bits outside the candidate set, or bits a layer loaded from a slim artifact
            does not keep (its ``dbq_available_bits``).
    """
    spec = get_spec(model)
    layers = _quant_layers(model)
    if isinstance(bits, Mapping):
        config = dict(bits)
        unknown = sorted(set(config) - set(layers))
        if unknown:
            some = list(layers)[:5]
            raise ValueError(
                f"set_bits(): unknown layer name(s) {unknown[:5]}; quantized layers are e.g. {some} "
                f"(see lightning_dbq.quantized_layers(model))"
            )
    else:
        config = dict.fromkeys(layers, bits)
    for name, b in config.items():
        if isinstance(b, bool) or not isinstance(b, int) or b not in spec.bits:
            raise ValueError(
                f"set_bits(): bits for {name!r} must be one of the candidate bits {list(spec.bits)}, got {b!r}"
            )
        kept = getattr(
            layers[name].layer, "dbq_available_bits", None
        )  # set by load_int on slim artifacts (quant/slim.py)
        if kept is not None and b not in kept:
            raise ValueError(f"set_bits(): {name!r} was loaded from a slim artifact that keeps only bits {list(kept)}, "
                             f"got {b}; load a full artifact to switch to other bits")  # fmt: skip
    for name, b in config.items():
        q = layers[name]
        q.weight_quant.active_bits = b
        if q.act_quant is not None:
            q.act_quant.active_bits = b
    for norm in model.modules():
        if isinstance(norm, PerBitNorm):
            norm.active_bits = layers[norm.owner].weight_quant.active_bits
        elif isinstance(norm, TransitionalNorm):
            own = layers[norm.owner].weight_quant.active_bits
            norm.active = (layers[norm.prev].weight_quant.active_bits if norm.prev else own, own)
    return model


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Choose the fake-quant back-end of every quantizer: ``"auto"`` (default: ``"compile"`` where a probe compiles
    on the input's device, else ``"fused"``; logged), ``"fused"``, ``"eager"`` or ``"compile"``.

    A run-time choice (not stored in the spec or in artifacts): every back-end computes the same forward values,
    see :mod:`lightning_dbq.quant.kernels`.

    Raises:
        ValueError: unknown back-end, or ``model`` was not prepared.
    """
    check_kernel(kernel)
    get_spec(model)
    for q in iter_quantizers(model):
        q.weight_quant.kernel = kernel
        if q.act_quant is not None:
            q.act_quant.kernel = kernel
    return model


def bit_config(model: nn.Module) -> dict[str, int]:
    """The active bits of every quantized layer, ``{layer_name: bits}``."""
    get_spec(model)
    return {q.name: q.weight_quant.active_bits for q in iter_quantizers(model)}


@contextlib.contextmanager
def quant_enabled(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Temporarily enable or disable every weight and activation quantizer (e.g. FP Hessian traces)."""
    layers = list(iter_quantizers(model))
    saved = [(q.weight_quant.enabled, q.act_quant.enabled if q.act_quant is not None else None) for q in layers]
    try:
        for q in layers:
            q.weight_quant.enabled = enabled
            if q.act_quant is not None:
                q.act_quant.enabled = enabled
        yield model
    finally:
        for q, (w_on, a_on) in zip(layers, saved, strict=True):
            q.weight_quant.enabled = w_on
            if q.act_quant is not None and a_on is not None:
                q.act_quant.enabled = a_on
