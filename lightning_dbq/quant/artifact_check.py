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

from lightning_dbq.quant.packing import code_range, pack_width, unpack_codes
from lightning_dbq.quant.registry import weight_quantizer_class
from lightning_dbq.quant.spec import QuantSpec

__all__ = [
    "INTERPOLATIONS",
    "MAX_CLASSES",
    "MAX_CLASS_NAME",
    "MAX_IMAGE_SIZE",
    "MODEL_KWARGS",
    "PREPROCESSING_KEYS",
    "ArtifactError",
    "check_class_names",
    "check_layers",
    "check_model_source",
    "check_preprocessing",
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
#: ``preprocessing.interpolation``: how inputs are resized to ``image_size`` ("none": never resized).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "none")
PREPROCESSING_KEYS = ("mean", "std", "image_size", "interpolation", "channels")
MAX_IMAGE_SIZE = 8192
MAX_CHANNELS = 64
MAX_CLASS_NAME = 256  # characters per class name
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
    """The manifest's ``layers`` list: names, shapes, element counts, code and storage widths.

    Each entry is ``{name, shape, numel, storage_bits}`` plus, in slim artifacts, ``code_bits`` (the width ``w`` of
    the stored codes, ``m <= w <= h`` with ``m`` the mode's narrowest width: 2, or 1 for binary; absent means
    ``h``). ``storage_bits`` must be the weight mode's storage width
    (:meth:`~lightning_dbq.quant.quantizers.WeightQuantizer.storage_bits`: the packing width of the codes, or 32 for
    a mode without codes such as ``weight_mode="unshared"``).

    Raises:
        ArtifactError: a malformed entry, a code width outside ``1..h`` or a storage width that does not match it.
    """
    if not isinstance(layers, list):
        raise ArtifactError(path, "layers", f"must be a list, got {type(layers).__name__}")
    quantizer = weight_quantizer_class(spec.weight_mode)
    seen: set[str] = set()
    base = {"name", "shape", "numel", "storage_bits"}
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(layer, Mapping) or set(layer) not in (base, base | {"code_bits"}):
            raise ArtifactError(
                path, where, "must be an object with exactly name, shape, numel, storage_bits (and optionally "
                "code_bits)"
            )  # fmt: skip
        name, shape, numel = layer["name"], layer["shape"], layer["numel"]
        if not isinstance(name, str) or name in seen:
            raise ArtifactError(path, f"{where}.name", f"must be a unique string, got {name!r}")
        seen.add(name)
        if not (isinstance(shape, list) and 1 <= len(shape) <= 5 and all(_int_in(1, 2**31)(d) for d in shape)):
            raise ArtifactError(path, f"{where}.shape", f"must be 1-5 positive integers, got {shape!r}")
        if not _int_in(1, 2**31)(numel) or numel != math.prod(shape):
            raise ArtifactError(path, f"{where}.numel", f"must equal the product of shape {shape}, got {numel!r}")
        code_bits = layer.get("code_bits", spec.high_bits)
        if not quantizer.has_codes and "code_bits" in layer:
            raise ArtifactError(path, f"{where}.code_bits", f"not allowed with weight_mode={spec.weight_mode!r} "
                                "(no codes)")  # fmt: skip
        low = min(quantizer.min_code_bits, spec.high_bits)
        if not _int_in(low, spec.high_bits)(code_bits):
            raise ArtifactError(
                path, f"{where}.code_bits", f"must be an integer in [{low}, {spec.high_bits}] (the spec's highest "
                f"bit), got {code_bits!r}"
            )  # fmt: skip
        want_bits = quantizer.storage_bits(code_bits)
        if layer["storage_bits"] != want_bits:
            raise ArtifactError(
                path, f"{where}.storage_bits", f"must be {want_bits} for {code_bits}-bit codes (bits "
                f"{list(spec.bits)}), got {layer['storage_bits']!r}"
            )  # fmt: skip
    return list(layers)


def decoded_codes(
    path: str | Path, packed: torch.Tensor, key: str, layer: Mapping[str, Any], bits: int
) -> torch.Tensor:
    """Unpack one layer's ``bits``-bit codes after checking dtype, length and range.

    Args:
        path: the artifact (for error messages).
        packed: the stored tensor (int8 for ``bits > 4``, packed uint8 otherwise; 1-bit codes are signs ``±1``).
        key: its name in the file (for error messages).
        layer: the layer's checked manifest entry (``shape``, ``numel``).
        bits: the width of the stored codes (``h``, or the layer's ``code_bits`` in a slim artifact).

    Returns:
        The int8 codes shaped like the layer's weight.

    Raises:
        ArtifactError: wrong dtype (e.g. int32 or float codes), wrong length, or codes outside
            ``[-2^(bits-1), 2^(bits-1) - 1]`` (:func:`~lightning_dbq.quant.packing.code_range`).
    """
    width = pack_width(bits)
    dtype = torch.int8 if width == 8 else torch.uint8
    numel = int(layer["numel"])
    length = numel if width == 8 else math.ceil(numel * width / 8)
    if packed.dtype != dtype or packed.dim() != 1 or packed.numel() != length:
        raise ArtifactError(
            path, key, f"codes must be a 1-D {dtype} tensor of {length} elements for {numel} {bits}-bit codes, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )  # fmt: skip
    codes = unpack_codes(packed, bits, numel)
    lo, hi = code_range(bits)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ArtifactError(
            path, key, f"codes must lie in [{lo}, {hi}] for {bits}-bit storage, found "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )  # fmt: skip
    return codes.reshape(layer["shape"])


def _is_number(v: Any) -> bool:
    """A finite JSON number (``bool`` excluded; integers too large for a float are not finite)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def check_preprocessing(path: str | Path, value: Any, field: str = "preprocessing") -> dict[str, Any]:
    """A ``preprocessing`` record: how a serving user must turn images into model inputs.

    Args:
        path: the artifact (or any label for the error messages).
        value: ``{mean, std, image_size, interpolation, channels}``: ``mean`` / ``std`` lists of ``channels`` finite
            numbers (``std > 0``), ``image_size`` an integer in ``[1, MAX_IMAGE_SIZE]``, ``interpolation`` one of
            :data:`INTERPOLATIONS`, ``channels`` an integer in ``[1, 64]``.
        field: the name used in error messages.

    Returns:
        A normalised copy (floats, ints, a plain dict with exactly those keys).

    Raises:
        ArtifactError: a missing or unknown key, or a value of the wrong type or outside its range (the message names
            the key and the allowed values).
    """
    if not isinstance(value, Mapping):
        raise ArtifactError(path, field, f"must be an object {{{', '.join(PREPROCESSING_KEYS)}}}, "
                            f"got {type(value).__name__}")  # fmt: skip
    missing = [k for k in PREPROCESSING_KEYS if k not in value]
    unknown = sorted(str(k) for k in value if k not in PREPROCESSING_KEYS)
    if missing or unknown:
        raise ArtifactError(path, field, f"missing key(s) {missing}, unknown key(s) {unknown}; the keys are "
                            f"{list(PREPROCESSING_KEYS)}")  # fmt: skip
    channels = value["channels"]
    if not _int_in(1, MAX_CHANNELS)(channels):
        raise ArtifactError(path, f"{field}.channels", f"must be an integer in [1, {MAX_CHANNELS}], got {channels!r}")
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        v = value[key]
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
            raise ArtifactError(path, f"{field}.{key}", f"must be a list of finite numbers, got {v!r}")
        if len(v) != channels:
            raise ArtifactError(path, f"{field}.{key}", f"must have one value per channel ({channels}), got {len(v)}")
        if key == "std" and not all(x > 0 for x in v):
            raise ArtifactError(path, f"{field}.std", f"must be positive, got {list(v)}")
        out[key] = [float(x) for x in v]
    size = value["image_size"]
    if not _int_in(1, MAX_IMAGE_SIZE)(size):
        raise ArtifactError(path, f"{field}.image_size", f"must be an integer in [1, {MAX_IMAGE_SIZE}], got {size!r}")
    mode = value["interpolation"]
    if not isinstance(mode, str) or mode not in INTERPOLATIONS:
        raise ArtifactError(path, f"{field}.interpolation", f"must be one of {list(INTERPOLATIONS)}, got {mode!r}")
    out.update(image_size=size, interpolation=mode, channels=channels)
    return {k: out[k] for k in PREPROCESSING_KEYS}


def check_class_names(
    path: str | Path, value: Any, num_classes: int | None = None, field: str = "class_names"
) -> list[str]:
    """A ``class_names`` list: the label of each class index.

    Args:
        path: the artifact (or any label for the error messages).
        value: a list of strings of at most :data:`MAX_CLASS_NAME` characters, 1 to :data:`MAX_CLASSES` entries.
        num_classes: the model's number of classes when known; the list must have exactly that many entries.
        field: the name used in error messages.

    Returns:
        A copy as a plain list.

    Raises:
        ArtifactError: not a list of strings, a name too long, or the wrong number of names.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ArtifactError(path, field, f"must be a list of strings, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_CLASSES:
        raise ArtifactError(path, field, f"must have 1 to {MAX_CLASSES} entries, got {len(value)}")
    for i, name in enumerate(value):
        if not isinstance(name, str) or len(name) > MAX_CLASS_NAME:
            raise ArtifactError(path, f"{field}[{i}]", f"must be a string of at most {MAX_CLASS_NAME} characters, "
                                f"got {type(name).__name__} {str(name)[:40]!r}")  # fmt: skip
    if num_classes is not None and len(value) != num_classes:
        raise ArtifactError(path, field, f"has {len(value)} entries but the model has {num_classes} classes")
    return list(value)


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
        scale_keys = ("weight_quant.scale_ref", "weight_quant.scale", "weight_quant.alpha")
        if key.endswith(scale_keys) or ".act_quant.scales." in key:
            if t.dtype not in _FLOATS or (t.numel() and not bool((t.abs() > 0).all())):
                raise ArtifactError(path, key, "scales must be finite, non-zero floats")
            if key.endswith(("scale_ref", "alpha")) and not bool((t > 0).all()):
                raise ArtifactError(path, key, "the reference scale must be positive")
        m = re.search(r"\.(?:act_quant\.scales|weight_quant\.scales|norms)\.(\d+)(?:_(\d+))?\.", key + ".")
        if m and not {m.group(1), m.group(2) or m.group(1)} <= bits:
            raise ArtifactError(path, key, f"per-bit tensor for a bit outside the spec's bits {sorted(spec.bits)}")
        if key.endswith("act_quant.initialized") and not bool(t.all()):
            raise ArtifactError(path, key, "activation quantizer was never initialised (no forward before saving)")
