"""Validation of int artifacts: the manifest is untrusted input until every field and tensor has been checked.

Everything here runs *before* a model is built: the manifest's schema and limits, the model source (a registered
local timm name and a whitelist of keyword arguments — never a hub name, a URL or a file path, so building never
touches the network or unpickles anything), and every tensor's dtype, shape, finiteness and code range. Each
failure is an :class:`ArtifactError` (a ``ValueError``) naming the file, the field or tensor, and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_dbq.quant.packing import pack_width, unpack_codes
from lightning_dbq.quant.spec import QuantSpec

__all__ = [
    "MAX_CLASSES",
    "MODEL_KWARGS",
    "ArtifactError",
    "check_layers",
    "check_model_source",
    "check_tensors",
    "decoded_codes",
]

# manifest model kwargs that may reach timm.create_model, with their checks (anything else is refused)
MAX_CLASSES = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_POOLS = ("avg", "max", "avgmax", "catavgmax", "", "token", "map")


def _int_in(lo: int, hi: int) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _float_in(lo: float, hi: float) -> Any:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= float(v) < hi


MODEL_KWARGS: dict[str, tuple[Any, str]] = {
    "num_classes": (_int_in(1, MAX_CLASSES), f"an integer in [1, {MAX_CLASSES}]"),
    "in_chans": (_int_in(1, 64), "an integer in [1, 64]"),
    "img_size": (_int_in(8, 4096), "an integer in [8, 4096]"),
    "drop_rate": (_float_in(0.0, 1.0), "a number in [0, 1)"),
    "drop_path_rate": (_float_in(0.0, 1.0), "a number in [0, 1)"),
    "global_pool": (lambda v: v in _POOLS, f"one of {list(_POOLS)}"),
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ArtifactError(ValueError):
    """An int artifact (or the data destined for one) is unreadable, altered, inconsistent or unsafe."""

    def __init__(self, path: str | Path, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path, self.field, self.problem = str(path), field, problem


def check_model_source(path: str | Path, source: Any) -> tuple[str, dict[str, Any]]:
    """A manifest ``model`` entry: a registered local timm name and whitelisted kwargs.

    Raises:
        ArtifactError: not an object, a name that is not a plain registered model name (``hf-hub:...``, URLs,
            paths), or a keyword argument outside :data:`MODEL_KWARGS` or its allowed range.
    """
    if not isinstance(source, Mapping):
        raise ArtifactError(path, "model", f"must be an object {{name, kwargs}}, got {type(source).__name__}")
    name, kwargs = source.get("name"), source.get("kwargs", {})
    if name is None:
        raise ArtifactError(path, "model.name", "the artifact records no model name; pass `model=` (an unprepared "
                            "instance of the architecture) to load_int")  # fmt: skip
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ArtifactError(
            path, "model.name", f"{name!r} is not a plain model name (letters, digits, '_', '.', '-'; no hub "
            "prefix, URL or path: artifacts only build registered local models)"
        )  # fmt: skip
    import timm

    import lightning_dbq.models  # noqa: F401  (registers cifar_resnet*)

    if not timm.is_model(name):
        raise ArtifactError(path, "model.name", f"{name!r} is not a registered timm / lightning_dbq model")
    if not isinstance(kwargs, Mapping):
        raise ArtifactError(path, "model.kwargs", f"must be an object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        rule = MODEL_KWARGS.get(key)
        if rule is None:
            raise ArtifactError(path, f"model.kwargs.{key}", f"not allowed; allowed keys: {sorted(MODEL_KWARGS)}")
        if not rule[0](value):
            raise ArtifactError(path, f"model.kwargs.{key}", f"must be {rule[1]}, got {value!r}")
    return name, dict(kwargs)


def check_layers(path: str | Path, layers: Any, spec: QuantSpec) -> list[dict[str, Any]]:
    """The manifest's ``layers`` list: names, shapes, element counts and storage widths.

    Raises:
        ArtifactError: a malformed entry or a storage width that does not match the spec.
    """
    if not isinstance(layers, list):
        raise ArtifactError(path, "layers", f"must be a list, got {type(layers).__name__}")
    want_bits = 32 if spec.weight_mode == "unshared" else pack_width(spec.high_bits)
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(layer, Mapping) or set(layer) != {"name", "shape", "numel", "storage_bits"}:
            raise ArtifactError(path, where, "must be an object with exactly name, shape, numel, storage_bits")
        name, shape, numel = layer["name"], layer["shape"], layer["numel"]
        if not isinstance(name, str) or name in seen:
            raise ArtifactError(path, f"{where}.name", f"must be a unique string, got {name!r}")
        seen.add(name)
        if not (isinstance(shape, list) and 1 <= len(shape) <= 5 and all(_int_in(1, 2**31)(d) for d in shape)):
            raise ArtifactError(path, f"{where}.shape", f"must be 1-5 positive integers, got {shape!r}")
        if not _int_in(1, 2**31)(numel) or numel != math.prod(shape):
            raise ArtifactError(path, f"{where}.numel", f"must equal the product of shape {shape}, got {numel!r}")
        if layer["storage_bits"] != want_bits:
            raise ArtifactError(
                path, f"{where}.storage_bits", f"must be {want_bits} for bits {list(spec.bits)}, got "
                f"{layer['storage_bits']!r}"
            )  # fmt: skip
    return list(layers)


def decoded_codes(
    path: str | Path, packed: torch.Tensor, key: str, layer: Mapping[str, Any], high_bits: int
) -> torch.Tensor:
    """Unpack one layer's codes after checking dtype, length and the ``h``-bit range.

    Raises:
        ArtifactError: wrong dtype (e.g. int32 or float codes), wrong length, or codes outside
            ``[-2^(h-1), 2^(h-1) - 1]``.
    """
    width = pack_width(high_bits)
    dtype = torch.int8 if width == 8 else torch.uint8
    numel = int(layer["numel"])
    length = numel if width == 8 else math.ceil(numel * width / 8)
    if packed.dtype != dtype or packed.dim() != 1 or packed.numel() != length:
        raise ArtifactError(
            path, key, f"codes must be a 1-D {dtype} tensor of {length} elements for {numel} {high_bits}-bit codes, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )  # fmt: skip
    codes = unpack_codes(packed, high_bits, numel)
    lo, hi = -(1 << (high_bits - 1)), (1 << (high_bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ArtifactError(
            path, key, f"codes must lie in [{lo}, {hi}] for {high_bits}-bit storage, found "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )  # fmt: skip
    return codes.reshape(layer["shape"])


def check_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], spec: QuantSpec) -> None:
    """Every non-code tensor: a float dtype (or an integer/bool buffer), finite values, positive scales.

    Raises:
        ArtifactError: a non-finite value, a non-positive or non-finite scale, an unexpected dtype, an activation
            quantizer that was never initialised, or a per-bit tensor for a bit outside ``spec.bits``.
    """
    bits = {str(b) for b in spec.bits}
    for key, t in tensors.items():
        if key.startswith("__codes__."):
            continue
        if t.dtype in _FLOATS:
            if not bool(torch.isfinite(t).all()):
                raise ArtifactError(path, key, f"{int((~torch.isfinite(t)).sum())} non-finite value(s)")
        elif t.dtype not in (torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8):
            raise ArtifactError(path, key, f"unexpected dtype {t.dtype}")
        if key.endswith(("weight_quant.scale_ref", "weight_quant.scale")) or ".act_quant.scales." in key:
            if t.dtype not in _FLOATS or (t.numel() and not bool((t.abs() > 0).all())):
                raise ArtifactError(path, key, "scales must be finite, non-zero floats")
            if key.endswith("scale_ref") and not bool((t > 0).all()):
                raise ArtifactError(path, key, "the reference scale must be positive")
        m = re.search(r"\.(?:act_quant\.scales|weight_quant\.scales|norms)\.(\d+)(?:_(\d+))?\.", key + ".")
        if m and not {m.group(1), m.group(2) or m.group(1)} <= bits:
            raise ArtifactError(path, key, f"per-bit tensor for a bit outside the spec's bits {sorted(spec.bits)}")
        if key.endswith("act_quant.initialized") and not bool(t.all()):
            raise ArtifactError(path, key, "activation quantizer was never initialised (no forward before saving)")
