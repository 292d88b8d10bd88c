"""Slim int artifacts: keep one bit configuration, or a subset of the candidate bits, with narrower codes.

A full artifact stores every layer's ``h``-bit codes ``q_h``; any candidate bit ``l`` is derived at run time by
Double Rounding (``q_l = clamp(rhu(q_h / 2^(h-l)))``). A slim artifact keeps only what some bits need:

* **one configuration** (``save_int(..., bits=4)`` or ``bits={layer: bits}``): each layer stores its own ``q_l`` at
  width ``l``, so a w4 layer costs a nibble per weight instead of a byte;
* **a bit subset** (``bits=[4, 2]``): each layer stores codes ``c_w`` at the *lowest* width ``w`` (``max(subset) <=
  w <= h``) at which some ``w``-bit codes reproduce, by Double Rounding, the model's codes at every kept bit. That
  ``w`` and those codes are found and checked numerically per layer (:func:`narrowest_width`): Double Rounding is
  not transitive (``rhu(rhu(24/16)/4) = 1`` but ``rhu(24/64) = 0``), so the 4-bit codes alone do not always give
  the 2-bit ones, and the ``w``-bit Double Rounding codes of ``q_h`` are not always the right ``w``-bit codes either
  (``q_h = 31``: ``rhu(31/2) = 16`` at 7 bits, ``rhu(16/32) = 1``, but ``rhu(31/64) = 0``; the code 15 gives both).

Loading decodes ``c_w`` to the ``h``-bit grid, ``c_w · 2^(h-w)``, and the weight ``c_w · 2^(h-w) · s_h``
(:func:`decode_weight`): the model keeps its full prepared architecture and its ``h``-bit quantizers, and at every
kept bit reproduces the saved model exactly; the other bits are refused by :func:`~lightning_dbq.set_bits`
(each quantized layer of a slim-loaded model carries the tuple of its kept bits as ``dbq_available_bits``).

Pure torch (no lightning, hydra or omegaconf import).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dbq.quant.artifact_check import ArtifactError
from lightning_dbq.quant.functional import decode_weight, expand_codes
from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.quant.prepare import bit_config, get_spec, set_bits
from lightning_dbq.quant.registry import weight_quantizer_class
from lightning_dbq.quant.spec import QuantSpec

__all__ = [
    "AVAILABLE_BITS_ATTR",
    "CONFIG_ATTR",
    "check_selection",
    "decode_weight",
    "expand_codes",
    "fake_weight",
    "narrowest_width",
    "nest_codes",
    "resolve_selection",
]

#: On a model loaded by ``load_int`` (tuple of bits) and on each quantized layer of a slim-loaded model (the bits
#: that layer can run at; ``set_bits`` refuses the others).
AVAILABLE_BITS_ATTR = "dbq_available_bits"
#: On a model loaded by ``load_int``: the stored ``{layer: bits}`` of a one-configuration artifact, else ``None``.
CONFIG_ATTR = "dbq_config"


def nest_codes(q_high: Tensor, high_bits: int, bits: int, mode: str = "double_round") -> Tensor:
    """The ``bits``-bit codes a quantizer derives from ``high_bits``-bit codes (int32).

    Args:
        q_high: signed ``high_bits``-bit integer codes.
        high_bits: their width ``h``.
        bits: the target width ``l <= h``.
        mode: the registered weight mode whose nesting to use
            (:meth:`~lightning_dbq.quant.quantizers.WeightQuantizer.nest_codes`): ``"double_round"``
            (``clamp(rhu(q_h / 2^k))``, :func:`~lightning_dbq.quant.functional.shift_codes`), ``"floor"``
            (``q_h >> k``, the floor-nesting baseline), ``"binary"`` (the codes themselves).

    Returns:
        The ``l``-bit codes, shaped like ``q_high``.
    """
    return weight_quantizer_class(mode).nest_codes(q_high, high_bits, bits)


def narrowest_width(
    q_high: Tensor, high_bits: int, kept: Sequence[int], mode: str = "double_round"
) -> tuple[int, Tensor]:
    """The lowest width ``w`` in ``[max(kept), h]`` at which ``w``-bit codes reproduce ``q_high``'s codes at every
    kept bit, and those codes.

    Candidate codes at ``w``: the mode's :meth:`~lightning_dbq.quant.quantizers.WeightQuantizer.candidate_codes` —
    for Double Rounding its own ``w``-bit codes ``nest(q_h, h, w)``, moved per weight to the nearest code inside the
    range of ``w``-bit codes whose rounding gives the target code at every kept bit. Double Rounding is not
    transitive (``q_h = 24``, ``h = 8``: ``rhu(rhu(24/16)/4) = 1`` but ``rhu(24/64) = 0``), so ``nest(q_h, h, 4)``
    alone does not always give the 2-bit codes; the 5-bit code 3 gives both. Every candidate is then checked exactly
    as the loaded model will use it, on the ``h``-bit grid: ``nest(c_w · 2^(h-w), h, l) == nest(q_h, h, l)`` for
    every kept ``l``. ``w = h`` always qualifies.

    Args:
        q_high: the layer's ``h``-bit codes.
        high_bits: ``h``.
        kept: the bits to keep (each ``<= h``).
        mode: the model's weight mode (e.g. ``"double_round"``, or ``"floor"``, which nests by truncation and so is
            transitive: ``w = max(kept)`` always qualifies).

    Returns:
        ``(w, c_w)``: the width and the int32 codes to store.
    """
    quantizer = weight_quantizer_class(mode)
    targets = [(b, quantizer.nest_codes(q_high, high_bits, b)) for b in kept]
    for w in range(max(kept), high_bits + 1):
        codes = quantizer.candidate_codes(q_high, high_bits, w, targets)
        grid = expand_codes(codes, w, high_bits)
        if all(torch.equal(quantizer.nest_codes(grid, high_bits, b), want) for b, want in targets):
            return w, codes
    raise AssertionError("unreachable: the h-bit codes reproduce themselves")  # pragma: no cover


def fake_weight(weight: Tensor, scale: Tensor, high_bits: int, bits: int, mode: str = "double_round") -> Tensor:
    """The fake-quantized weight a :class:`~lightning_dbq.quant.quantizers.WeightQuantizer` of ``mode`` computes at
    ``bits`` from its stored scale (the eager reference functions; every kernel back-end gives the same values bit
    for bit)."""
    return weight_quantizer_class(mode).fake_weight(weight, scale, high_bits, bits)


def _bits_value(v: Any, spec: QuantSpec) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in spec.bits


def check_selection(
    path: str | Path, manifest: Mapping[str, Any], spec: QuantSpec, layers: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, int] | None, tuple[int, ...] | None]:
    """The manifest's ``config`` / ``available_bits`` against its spec and (already checked) ``layers``.

    Rules: at most one of the two is set; neither is allowed for a mode without codes (``weight_mode="unshared"``);
    ``config`` names
    exactly the coded layers, each with a bit of ``spec.bits``; ``available_bits`` is a non-empty list of distinct
    bits of ``spec.bits``; every layer's ``code_bits`` can hold the bits it keeps; a full artifact (neither set)
    stores every layer at ``h`` bits.

    Returns:
        ``(config, available_bits)``: the configuration dict or ``None``, the kept bits (descending) or ``None``.

    Raises:
        ArtifactError: naming ``config``, ``available_bits`` or ``layers[i].code_bits``.
    """
    config, available = manifest.get("config"), manifest.get("available_bits")
    if config is not None and available is not None:
        raise ArtifactError(path, "config", "an artifact keeps one configuration (config) or a bit subset "
                            "(available_bits), not both")  # fmt: skip
    if (config is not None or available is not None) and not weight_quantizer_class(spec.weight_mode).has_codes:
        raise ArtifactError(path, "config" if config is not None else "available_bits", "slim artifacts need shared "
                            f"codes; weight_mode={spec.weight_mode!r} stores FP32 weights")  # fmt: skip
    coded = {layer["name"]: layer for layer in layers if layer["storage_bits"] != 32}
    high = spec.high_bits
    if config is not None:
        if not isinstance(config, Mapping):
            raise ArtifactError(path, "config", f"must be an object {{layer: bits}}, got {type(config).__name__}")
        missing, unknown = sorted(set(coded) - set(config)), sorted(set(config) - set(coded))
        if missing or unknown:
            raise ArtifactError(path, "config", f"must name exactly the manifest's layers; missing {missing[:5]}, "
                                f"unknown {unknown[:5]}")  # fmt: skip
        for name, b in config.items():
            if not _bits_value(b, spec):
                raise ArtifactError(path, f"config[{name!r}]", f"must be one of the bits {list(spec.bits)}, got {b!r}")
        need = {name: int(b) for name, b in config.items()}
    elif available is not None:
        if (
            not isinstance(available, list)
            or not available
            or not all(_bits_value(b, spec) for b in available)
            or len(set(available)) != len(available)
        ):
            raise ArtifactError(path, "available_bits", f"must be a non-empty list of distinct bits of "
                                f"{list(spec.bits)}, got {available!r}")  # fmt: skip
        need = dict.fromkeys(coded, max(available))
    else:
        need = dict.fromkeys(coded, high)
    for i, layer in enumerate(layers):
        name = layer["name"]
        if name not in need:
            continue
        code_bits = layer.get("code_bits", high)
        if config is None and available is None and code_bits != high:
            raise ArtifactError(path, f"layers[{i}].code_bits", f"must be {high} in a full artifact (no config or "
                                f"available_bits), got {code_bits}")  # fmt: skip
        if code_bits < need[name]:
            raise ArtifactError(path, f"layers[{i}].code_bits", f"{code_bits}-bit codes cannot hold the "
                                f"{need[name]}-bit codes this artifact keeps for {name!r}")  # fmt: skip
    kept = None if available is None else tuple(sorted((int(b) for b in available), reverse=True))
    return (None if config is None else dict(need)), kept


def resolve_selection(
    path: str | Path, model: nn.Module, bits: int | Sequence[int] | Mapping[str, int] | None
) -> tuple[dict[str, int] | None, tuple[int, ...] | None]:
    """``save_int``'s ``bits=`` argument as ``(config, subset)``; at most one is not ``None``.

    ``None`` keeps every candidate bit, except on a model loaded from a slim artifact, which is saved with the same
    selection again (its ``dbq_config``, else its ``dbq_available_bits``). An ``int`` or a ``{layer: bits}``
    mapping naming *every* quantized layer is one configuration, validated by :func:`~lightning_dbq.set_bits`
    itself (the model's bits are restored afterwards). A list is a bit subset.

    Raises:
        ArtifactError: (field ``bits``) a mapping that misses layers, unknown layers or bits outside the candidate
            set, an empty / repeated subset, bits a slim-loaded layer does not keep, or any selection on a model
            without shared codes (``weight_mode="unshared"``).
    """
    spec = get_spec(model)
    layers = {q.name: q.layer for q in iter_quantizers(model)}
    kept = {n: getattr(m, AVAILABLE_BITS_ATTR, None) for n, m in layers.items()}
    if bits is None:
        if all(k is None for k in kept.values()):
            return None, None
        stored, available = getattr(model, CONFIG_ATTR, None), getattr(model, AVAILABLE_BITS_ATTR, None)
        if isinstance(stored, Mapping):
            bits = dict(stored)
        elif isinstance(available, (tuple, list)):
            bits = list(available)
        else:
            raise ArtifactError(path, "bits", "the model's layers come from a slim artifact but the model records "
                                "neither dbq_config nor dbq_available_bits; pass bits= explicitly")  # fmt: skip
    if not weight_quantizer_class(spec.weight_mode).has_codes:
        raise ArtifactError(path, "bits", f"slim artifacts need shared integer codes; weight_mode={spec.weight_mode!r}"
                            " stores FP32 weights (use bits=None)")  # fmt: skip
    if isinstance(bits, Mapping) or (isinstance(bits, int) and not isinstance(bits, bool)):
        if isinstance(bits, Mapping):
            missing = [n for n in layers if n not in bits]
            if missing:
                raise ArtifactError(path, "bits", f"a configuration must give every quantized layer its bits; "
                                    f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")  # fmt: skip
        saved = bit_config(model)
        try:
            set_bits(model, bits)
            config = bit_config(model)
        except ValueError as e:
            raise ArtifactError(path, "bits", str(e).removeprefix("set_bits(): ")) from None
        finally:
            set_bits(model, saved)
        return config, None
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence):
        raise ArtifactError(path, "bits", f"must be None, an int, a {{layer: bits}} mapping or a list of bits, "
                            f"got {type(bits).__name__}")  # fmt: skip
    values = list(bits)
    if not values or not all(_bits_value(b, spec) for b in values) or len(set(values)) != len(values):
        raise ArtifactError(path, "bits", f"a bit subset must be a non-empty list of distinct candidate bits "
                            f"{list(spec.bits)}, got {values!r}")  # fmt: skip
    for name, k in kept.items():
        if k is not None and not set(values) <= set(k):
            raise ArtifactError(path, "bits", f"layer {name!r} was loaded from a slim artifact that keeps only bits "
                                f"{list(k)}, got {values}")  # fmt: skip
    return None, tuple(sorted(values, reverse=True))
