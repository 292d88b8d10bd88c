"""QuantSpec: the validated, serialisable description of how a model was prepared."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_dbq.quant.functional import MAX_BITS, MIN_BITS
from lightning_dbq.quant.registry import weight_quantizer_class

__all__ = ["WEIGHT_MODES", "QuantSpec", "validate_bits"]

from lightning_dbq.options import WEIGHT_MODES  # noqa: E402


def validate_bits(bits: Any, name: str = "bits") -> tuple[int, ...]:
    """Validate a candidate bit list and return it sorted descending.

    Bits lie in ``[2, 8]``; the one exception is ``[1]`` alone, the single precision of a binary model
    (``weight_mode="binary"``). Which lists a weight mode accepts is checked by :class:`QuantSpec`.

    Raises:
        ValueError: empty, duplicates, a value outside ``[2, 8]``, or 1 next to other bits.
        TypeError: not a sequence of integers (``bool`` and ``float`` are rejected).

    Example:
        >>> validate_bits([4, 8, 2, 6])
        (8, 6, 4, 2)
    """
    if isinstance(bits, (str, bytes, Mapping)) or not isinstance(bits, Iterable):
        raise TypeError(f"`{name}` must be a list of integers in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    values = list(bits)
    if not values:
        raise ValueError(
            f"`{name}` must not be empty; give candidate bits in [{MIN_BITS}, {MAX_BITS}], e.g. [8, 6, 4, 2]"
        )
    for b in values:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise TypeError(f"`{name}` must contain integers, got {b!r} ({type(b).__name__}) in {values!r}")
        if not (MIN_BITS <= int(b) <= MAX_BITS or (int(b) == 1 and len(values) == 1)):
            hint = "; 1 bit is allowed only alone: bits=[1] with weight_mode='binary'" if int(b) == 1 else ""
            raise ValueError(f"`{name}` values must be in [{MIN_BITS}, {MAX_BITS}], got {int(b)} in {values!r}{hint}")
    ints = [int(b) for b in values]
    dups = sorted({b for b in ints if ints.count(b) > 1})
    if dups:
        raise ValueError(f"`{name}` must not contain duplicates, got {dups} repeated in {ints!r}")
    return tuple(sorted(ints, reverse=True))


@dataclass(frozen=True)
class QuantSpec:
    """How :func:`lightning_dbq.prepare` converts a model; stored in checkpoints and int artifacts.

    Attributes:
        bits: candidate bits, descending (the first is the stored precision ``h``).
        per_channel: per-output-channel weight scales.
        quantize_first: also quantize the first layer (timm ``pretrained_cfg['first_conv']``).
        quantize_last: also quantize the classifier (timm ``pretrained_cfg['classifier']``).
        quantize_acts: quantize each quantized layer's input with per-bit LSQ scales.
        per_bit_norm: one BatchNorm copy per bit after quantized layers.
        skip: fnmatch patterns of layer names to keep in floating point.
        transitional_norm: norms keyed by (previous layer bits, layer bits) for mixed precision (needs
            ``per_bit_norm``).
        weight_mode: a registered weight mode (:mod:`lightning_dbq.quant.registry`): ``"double_round"`` (the
            method), a baseline — ``"floor"`` (floor nesting ``q_h >> k``, AdaBits-style) or ``"unshared"`` (one LSQ
            scale per bit, FP32 storage: the paper's "Ours*") — or ``"binary"`` (1-bit weights and activations,
            ``bits=[1]`` only).
    """

    bits: tuple[int, ...] = (8, 6, 4, 2)
    per_channel: bool = False
    quantize_first: bool = False
    quantize_last: bool = False
    quantize_acts: bool = True
    per_bit_norm: bool = True
    skip: tuple[str, ...] = field(default_factory=tuple)
    transitional_norm: bool = False
    weight_mode: str = "double_round"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", validate_bits(self.bits))
        if isinstance(self.skip, str):
            raise TypeError(f"`skip` must be a list of name patterns, got the string {self.skip!r}")
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))
        weight_quantizer_class(self.weight_mode).check_bits(self.bits)

    @property
    def high_bits(self) -> int:
        """The stored precision ``h = max(bits)``."""
        return self.bits[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON and ``weights_only`` checkpoint safe)."""
        d = asdict(self)
        d["bits"] = list(self.bits)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown QuantSpec field(s) {unknown}; allowed: {sorted(allowed)}")
        kw = dict(d)
        if "bits" in kw:
            kw["bits"] = tuple(validate_bits(kw["bits"]))
        if "skip" in kw:
            if isinstance(kw["skip"], str) or not isinstance(kw["skip"], (list, tuple)):
                raise ValueError(f"QuantSpec field skip must be a list of name patterns, got {kw['skip']!r}")
            kw["skip"] = tuple(kw["skip"])
        return cls(**kw)
