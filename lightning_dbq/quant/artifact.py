"""The integer artifact: ``*.dbq.safetensors`` (docs/design.md §5).

Contents: the ``h``-bit integer codes of every quantized weight (packed into nibbles/crumbs when ``h <= 4``),
every other tensor of the state dict as is (FP first/last layers, biases, per-bit norms, weight scales, per-bit
activation scales), and a JSON manifest in the safetensors header: format name and version, bit list, the
:class:`QuantSpec`, the model source (timm name + whitelisted kwargs), the layer list, free-form ``extra`` and a
SHA-256 checksum over every tensor *and the canonical manifest* (format 2), optionally with an HMAC-SHA256 under a
deployment key (``key=`` or ``LIGHTNING_DBQ_ARTIFACT_KEY``).

Optional manifest fields (absent when not set; :func:`read_manifest` returns them as ``None`` then):
``preprocessing`` (``{mean, std, image_size, interpolation, channels}``: what a serving user must do to an image,
see :func:`lightning_dbq.data.preprocess.apply_preprocessing`), ``class_names`` (one label per class index), and,
for *slim* artifacts (:mod:`lightning_dbq.quant.slim`, ``save_int(..., bits=...)``), either ``config``
(``{layer: bits}``: one configuration, each layer's codes at its own width) or ``available_bits`` (a bit subset,
each layer's codes at the narrowest width that reproduces every kept bit); each layer entry then also records
``code_bits``, the width of its stored codes.

An artifact is untrusted input: :func:`load_int` checks the checksum (and the HMAC when a key is set), then the
manifest's schema and limits, the model source (registered local models only: no network, no file the artifact
names) and every tensor (dtypes, shapes, code ranges, finite positive scales) before building anything
(:mod:`lightning_dbq.quant.artifact_check`); nothing is unpickled. Writes are atomic: a short temp file in the same
folder, renamed into place; temp files left by a killed writer are swept by the next save in that folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_dbq.quant.artifact_check import (
    ArtifactError,
    check_class_names,
    check_layers,
    check_model_source,
    check_preprocessing,
    check_tensors,
    decoded_codes,
)
from lightning_dbq.quant.layers import QuantizedLayer, iter_quantizers
from lightning_dbq.quant.packing import pack_codes
from lightning_dbq.quant.prepare import get_spec, prepare, set_bits
from lightning_dbq.quant.quantizers import ActQuantizer
from lightning_dbq.quant.slim import (
    AVAILABLE_BITS_ATTR,
    CONFIG_ATTR,
    check_selection,
    narrowest_width,
    resolve_selection,
)
from lightning_dbq.quant.spec import QuantSpec

__all__ = [
    "CLASS_NAMES_ATTR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KEY_ENV",
    "PREPROCESSING_ATTR",
    "ArtifactError",
    "load_int",
    "read_manifest",
    "save_int",
]

FORMAT_NAME = "lightning_dbq.int"
FORMAT_VERSION = 2  # 2: the checksum covers the manifest; 1 (tensors only) is still read, with a warning
KEY_ENV = "LIGHTNING_DBQ_ARTIFACT_KEY"
_META_KEY = "lightning_dbq"
_CODES_PREFIX = "__codes__."
_PARTIAL = ".partial"
SOURCE_ATTR = "_dbq_source"
_MANIFEST_KEYS = {"format", "version", "bits", "spec", "model", "layers", "checksum", "extra"}
# optional fields: absent (or null, which the checksum treats as absent) when not set
_OPTIONAL_KEYS = ("preprocessing", "class_names", "config", "available_bits")
PREPROCESSING_ATTR = "dbq_preprocessing"  # on a loaded model: the manifest's preprocessing dict, or None
CLASS_NAMES_ATTR = "dbq_class_names"  # on a loaded model: the manifest's class names, or None


def _model_source(model: nn.Module, model_name: str | None, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_name is not None:
        return {"name": model_name, "kwargs": dict(model_kwargs or {})}
    source = getattr(model, SOURCE_ATTR, None)
    if source is not None:
        return {"name": source["name"], "kwargs": dict(source.get("kwargs", {}))}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch:
        kwargs: dict[str, Any] = {}
        if isinstance(getattr(model, "num_classes", None), int):
            kwargs["num_classes"] = model.num_classes
        return {"name": arch, "kwargs": kwargs}
    return {"name": None, "kwargs": {}}


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> hashlib._Hash:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    """The manifest without its ``checksum`` / ``hmac`` fields and without optional fields set to ``null`` (the same
    as absent) as canonical JSON (sorted keys, no spaces)."""
    body = {
        k: v for k, v in manifest.items() if k not in ("checksum", "hmac") and not (k in _OPTIONAL_KEYS and v is None)
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _checksum(tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and, from format 2 on, the canonical manifest."""
    h = _tensor_digest(tensors)
    if manifest is not None:
        h.update(b"\x00manifest\x00")
        h.update(_canonical(manifest))
    return h.hexdigest()


def _hmac(key: bytes, checksum: str) -> str:
    return hmac.new(key, checksum.encode(), hashlib.sha256).hexdigest()


def _resolve_key(key: str | bytes | None) -> bytes | None:
    if key is None:
        key = os.environ.get(KEY_ENV) or None
    if key is None:
        return None
    return key.encode() if isinstance(key, str) else bytes(key)


def _refuse_bad_state(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """save_int refuses non-finite tensors and activation quantizers that never saw a batch."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ArtifactError(path, "model", f"{len(bad)} tensor(s) hold NaN/inf values (diverged training?), e.g. "
                            f"{bad[:5]}; nothing was written")  # fmt: skip
    cold = [n for n, m in model.named_modules() if isinstance(m, ActQuantizer) and not bool(m.initialized)]
    if cold:
        raise ArtifactError(
            path, "model", f"activation quantizer(s) never initialised: {cold[:5]}; run a forward at every bit "
            "first, e.g. lightning_dbq.calibrate(model, batches); nothing was written"
        )  # fmt: skip


def _sweep_partials(folder: Path) -> None:
    """Remove temp files of earlier saves in ``folder`` whose writer process is gone (e.g. killed mid-write)."""
    for f in folder.glob(f".dbq-*{_PARTIAL}"):
        pid = f.name[len(".dbq-") :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            f.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _num_classes(model: nn.Module, source: Mapping[str, Any]) -> int | None:
    """The model's number of classes when known (its ``num_classes`` attribute, else the source kwargs)."""
    for n in (getattr(model, "num_classes", None), source.get("kwargs", {}).get("num_classes")):
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _slim_layer(path: Path, q: QuantizedLayer, q_high: torch.Tensor, kept: Sequence[int]) -> tuple[int, torch.Tensor]:
    """The narrowest codes of one layer for the ``kept`` bits, verified on the float weights the loaded model will
    compute with (``fake(decode(codes)) == fake(weight)`` at every kept bit, bit for bit)."""
    wq, name = q.weight_quant, q.name
    high, fake = wq.high_bits, type(wq).fake_weight
    width, codes = narrowest_width(q_high, high, kept, wq.mode)
    weight = q.layer.weight.detach().cpu()
    scale = wq.effective_scale().detach().cpu()
    rebuilt = wq.decode(codes, width).cpu().to(weight.dtype)  # on the scale's device, then back
    for b in kept:
        if not torch.equal(fake(weight, scale, high, b), fake(rebuilt, scale, high, b)):
            raise ArtifactError(path, f"layer {name!r}", f"its {width}-bit codes do not reproduce its {b}-bit weights "
                                "exactly; nothing was written")  # fmt: skip
    return width, codes


def save_int(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    key: str | bytes | None = None,
    bits: int | Sequence[int] | Mapping[str, int] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the integer artifact of a prepared model.

    Args:
        model: a model prepared with :func:`lightning_dbq.prepare` (in any bit state; nothing is changed).
        path: output path (``.dbq.safetensors`` by convention).
        model_name: timm name to rebuild the model with; default: the name recorded by
            :func:`lightning_dbq.create_model` / ``DBQModule``, else ``pretrained_cfg['architecture']``. Must be a
            registered local model (checked like :func:`load_int` will).
        model_kwargs: kwargs for ``timm.create_model`` (e.g. ``num_classes``; see
            :data:`~lightning_dbq.quant.artifact_check.MODEL_KWARGS` for the allowed keys).
        extra: any JSON-serialisable metadata to keep in the manifest (e.g. accuracies); covered by the checksum.
        key: optional HMAC key (default: the ``LIGHTNING_DBQ_ARTIFACT_KEY`` environment variable): adds an
            HMAC-SHA256 of the checksum, for tamper-evidence rather than corruption detection.
        bits: what to keep (:mod:`lightning_dbq.quant.slim`). ``None``: every candidate bit, ``h``-bit codes (a
            model loaded from a slim artifact keeps its selection). An ``int`` or ``{layer: bits}`` naming every
            quantized layer: that one configuration, each layer's codes stored at its own bits (manifest
            ``config``). A list such as ``[4, 2]``: those bits, each layer's codes at the narrowest width that
            reproduces every one of them, verified per layer (manifest ``available_bits``). Norms, scales and
            biases of every bit are kept either way, so the loaded model has the same prepared architecture.
        preprocessing: ``{mean, std, image_size, interpolation, channels}`` (e.g. a data module's
            ``preprocessing``), checked by :func:`~lightning_dbq.quant.artifact_check.check_preprocessing`.
        class_names: one label per class index (e.g. a data module's ``class_names``); as many as the model's
            ``num_classes`` when that is known.

    Returns:
        The written path.

    Raises:
        ArtifactError: non-finite tensors, uninitialised activation quantizers, a model source that
            :func:`load_int` would refuse, an invalid ``bits`` / ``preprocessing`` / ``class_names`` (the error
            names the field and the allowed values). Nothing is written then.
    """
    spec = get_spec(model)
    path = Path(path)
    source = _model_source(model, model_name, model_kwargs)
    meta: dict[str, Any] = {}
    if preprocessing is not None:
        meta["preprocessing"] = check_preprocessing(path, preprocessing)
    if class_names is not None:
        meta["class_names"] = check_class_names(path, class_names, _num_classes(model, source))
    config, subset = resolve_selection(path, model, bits)
    if config is not None:
        meta["config"] = config
    if subset is not None:
        meta["available_bits"] = list(subset)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _refuse_bad_state(path, model, state)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    coded: set[str] = set()
    for q in iter_quantizers(model):
        name, wq, weight = q.name, q.weight_quant, q.layer.weight
        wkey = f"{name}.weight" if name else "weight"
        if not wq.has_codes:  # e.g. baseline "Ours*": no shared codes, FP32 weights stay in `state`
            layers.append({"name": name, "shape": list(weight.shape), "numel": weight.numel(),
                           "storage_bits": wq.storage_bits(spec.high_bits)})  # fmt: skip
            continue
        codes = wq.codes(weight.detach()).cpu()
        entry: dict[str, Any] = {"name": name, "shape": list(codes.shape), "numel": codes.numel()}
        width = spec.high_bits
        if config is not None or subset is not None:
            kept = (config[name],) if config is not None else subset
            assert kept is not None
            width, codes = _slim_layer(path, q, codes, kept)
            entry["code_bits"] = width
        tensors[_CODES_PREFIX + wkey] = pack_codes(codes, width).contiguous()
        coded.add(wkey)
        entry["storage_bits"] = wq.storage_bits(width)
        layers.append(entry)
    for k, v in state.items():
        if k not in coded:
            tensors[k] = v.contiguous().clone()
    if source["name"] is not None:
        check_model_source(path, source)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "bits": list(spec.bits),
        "spec": spec.to_dict(),
        "model": source,
        "layers": layers,
        "extra": dict(extra or {}),
        **meta,
    }
    try:
        manifest["checksum"] = _checksum(tensors, manifest)
    except (TypeError, ValueError) as e:
        raise ArtifactError(path, "extra", f"must be JSON-serialisable without NaN/inf: {e}") from e
    secret = _resolve_key(key)
    if secret is not None:
        manifest["hmac"] = _hmac(secret, manifest["checksum"])
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(path.parent)
    # short temp name in the same folder (same file system for the atomic rename); the pid lets a later save
    # sweep it if this process dies mid-write
    tmp = path.parent / f".dbq-{os.getpid()}-{secrets.token_hex(4)}{_PARTIAL}"
    try:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(manifest)})
        os.chmod(tmp, _file_mode())  # a server running as another user must be able to read it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _file_mode() -> int:
    """``0o666`` minus the process umask (what ``open()`` would have given a new file)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the manifest of an artifact and check its shape (no tensors are loaded, nothing is verified yet).

    Returns:
        The manifest as written, plus ``None`` for each optional field it does not have (``preprocessing``,
        ``class_names``, ``config``, ``available_bits``), so ``read_manifest(p)["class_names"]`` never raises.

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: not a readable safetensors file (truncated/corrupt), not a lightning_dbq artifact, an
            unsupported format version, a manifest that is not a JSON object with the expected fields, or an
            invalid ``preprocessing`` / ``class_names`` / ``config`` / ``available_bits`` (naming the field).
    """
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(path, "file", "is a directory, not an artifact file")
    if not path.is_file():
        raise FileNotFoundError(f"load_int: no such artifact file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ArtifactError(path, "file", f"not a readable safetensors file (truncated or corrupt): {e}") from e
    if _META_KEY not in meta:
        raise ArtifactError(
            path, "header", f"a safetensors file but not a lightning_dbq artifact (no '{_META_KEY}' manifest)"
        )
    try:
        manifest = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(path, "manifest", f"not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(path, "manifest", f"must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") not in (1, FORMAT_VERSION):
        raise ArtifactError(
            path, "manifest.format", f"format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
            f"lightning_dbq reads {FORMAT_NAME!r} versions 1 and {FORMAT_VERSION}"
        )  # fmt: skip
    missing = sorted(_MANIFEST_KEYS - set(manifest))
    optional = {"hmac", *_OPTIONAL_KEYS} if manifest["version"] != 1 else {"hmac"}  # v1: manifest not checksummed
    unknown = sorted(set(manifest) - _MANIFEST_KEYS - optional)
    if missing or unknown:
        raise ArtifactError(path, "manifest", f"missing field(s) {missing}, unknown field(s) {unknown}")
    _check_optional(path, manifest)
    for k in _OPTIONAL_KEYS:
        manifest.setdefault(k, None)
    return manifest


def _check_optional(path: Path, manifest: Mapping[str, Any]) -> None:
    """Types and limits of the optional fields that need nothing but the manifest (the checksum still covers the
    values as written: nothing is normalised here). ``config`` / ``available_bits`` are checked against the spec and
    the layers by :func:`~lightning_dbq.quant.slim.check_selection` in :func:`load_int`."""
    if manifest.get("preprocessing") is not None:
        check_preprocessing(path, manifest["preprocessing"])
    if manifest.get("class_names") is not None:
        source = manifest["model"] if isinstance(manifest["model"], Mapping) else {}
        kwargs = source.get("kwargs")
        n = kwargs.get("num_classes") if isinstance(kwargs, Mapping) else None
        check_class_names(path, manifest["class_names"], n if isinstance(n, int) and not isinstance(n, bool) else None)
    config = manifest.get("config")
    if config is not None and not (
        isinstance(config, Mapping) and all(isinstance(v, int) and not isinstance(v, bool) for v in config.values())
    ):
        raise ArtifactError(path, "config", f"must be an object {{layer: bits}} with integer bits, got {config!r:.80}")
    bits = manifest.get("available_bits")
    if bits is not None and not (isinstance(bits, list) and all(type(b) is int for b in bits)):
        raise ArtifactError(path, "available_bits", f"must be a list of integer bits, got {bits!r:.80}")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = f.get_tensor(k)
        return out
    except Exception as e:
        raise ArtifactError(path, "tensors", f"could not be read (truncated or corrupt): {e}") from e


def _verify(path: Path, manifest: dict[str, Any], tensors: Mapping[str, torch.Tensor], key: bytes | None) -> None:
    recorded = manifest["checksum"]
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise ArtifactError(path, "manifest.checksum", "must be a 64-character SHA-256 hex digest")
    if manifest["version"] == 1:
        import warnings

        warnings.warn(f"{path}: format 1 artifact: its manifest is not covered by the checksum; re-save it with "
                      "save_int to get format 2", stacklevel=3)  # fmt: skip
        actual = _checksum(tensors)
    else:
        actual = _checksum(tensors, manifest)
    if not hmac.compare_digest(actual, recorded):
        raise ArtifactError(path, "checksum", "mismatch: tensors or manifest were altered after saving")
    if key is not None:
        tag = manifest.get("hmac")
        if not isinstance(tag, str) or not hmac.compare_digest(tag, _hmac(key, recorded)):
            raise ArtifactError(path, "hmac", "missing or wrong for the configured key (not written by its holder)")


def load_int(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, key: str | bytes | None = None
) -> nn.Module:
    """Rebuild a bit-switchable model from an integer artifact, ready for :func:`lightning_dbq.set_bits`.

    Args:
        path: a ``*.dbq.safetensors`` file written by :func:`save_int`.
        model: an *unprepared* model of the right architecture, for models that timm cannot build by name;
            by default the model is built with ``timm.create_model(name, pretrained=False, **kwargs)`` from the
            manifest, after checking that ``name`` is a registered local model and every kwarg is whitelisted.
        key: HMAC key (default: ``LIGHTNING_DBQ_ARTIFACT_KEY``); when set, the artifact must carry a matching HMAC.

    Returns:
        The model in eval mode. Its float weights are ``c · 2^(h-w) · s_h`` (``c``: the stored ``w``-bit codes;
        ``w = h`` in a full artifact), so every kept bit reproduces the saved model exactly. A full artifact is
        loaded at the highest bit, a one-configuration artifact at its configuration, a bit subset at its highest
        kept bit. Plain attributes: ``dbq_preprocessing`` (dict) and ``dbq_class_names`` (list), ``None`` when
        the artifact has none; ``dbq_available_bits`` (tuple, descending: every candidate bit, the kept subset, or
        the distinct bits of the configuration) and ``dbq_config`` (the stored ``{layer: bits}``, or ``None``).
        On a slim artifact each quantized layer also carries its kept bits as ``dbq_available_bits``, and
        :func:`~lightning_dbq.set_bits` refuses any other bit with a ``ValueError`` naming them.

    Raises:
        FileNotFoundError: no such file.
        ArtifactError: (a ``ValueError``) corrupt/truncated/altered file, not an artifact, a model source that is not
            a registered local model, invalid tensors, or tensors that do not fit the model, or invalid optional
            fields (``preprocessing``, ``class_names``, ``config``, ``available_bits``, ``layers[i].code_bits``).
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensors = _load_tensors(path)
    _verify(path, manifest, tensors, _resolve_key(key))
    try:
        spec = QuantSpec.from_dict(manifest["spec"]) if isinstance(manifest["spec"], dict) else None
    except (TypeError, ValueError) as e:
        raise ArtifactError(path, "manifest.spec", str(e)) from e
    if spec is None:
        raise ArtifactError(path, "manifest.spec", "must be an object")
    if manifest["bits"] != list(spec.bits):
        raise ArtifactError(path, "manifest.bits", f"{manifest['bits']!r} disagrees with spec.bits {list(spec.bits)}")
    layers = check_layers(path, manifest["layers"], spec)
    config, subset = check_selection(path, manifest, spec, layers)
    check_tensors(path, tensors, spec)
    coded = [layer for layer in layers if layer["storage_bits"] != 32]
    codes: dict[str, tuple[torch.Tensor, int]] = {}
    for layer in coded:
        wkey = f"{layer['name']}.weight" if layer["name"] else "weight"
        if _CODES_PREFIX + wkey not in tensors:
            raise ArtifactError(path, _CODES_PREFIX + wkey, "missing: the manifest lists this layer")
        width = int(layer.get("code_bits", spec.high_bits))
        codes[wkey] = (decoded_codes(path, tensors[_CODES_PREFIX + wkey], _CODES_PREFIX + wkey, layer, width), width)
    orphans = sorted(k for k in tensors if k.startswith(_CODES_PREFIX) and k[len(_CODES_PREFIX) :] not in codes)
    if orphans:
        raise ArtifactError(path, orphans[0], "codes for a layer the manifest does not list")
    if model is None:
        name, kwargs = check_model_source(path, manifest["model"])
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
        setattr(model, SOURCE_ATTR, {"name": name, "kwargs": kwargs})
    n_classes = getattr(model, "num_classes", None)
    if manifest["class_names"] is not None and isinstance(n_classes, int) and not isinstance(n_classes, bool):
        check_class_names(path, manifest["class_names"], n_classes)
    try:
        prepare(model, **spec.to_dict())
    except (TypeError, ValueError) as e:
        raise ArtifactError(path, "model", f"cannot be prepared with the artifact's spec: {e}") from e
    state: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if not k.startswith(_CODES_PREFIX)}
    for wkey, (c, _) in codes.items():  # placeholders: the weights are decoded once the scales are loaded
        target = model.state_dict().get(wkey)
        if target is None or tuple(target.shape) != tuple(c.shape):
            raise ArtifactError(path, wkey, f"codes of shape {tuple(c.shape)} do not fit the model's "
                                f"{None if target is None else tuple(target.shape)}")  # fmt: skip
        state[wkey] = torch.zeros_like(target)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(path, "tensors", f"do not match the model ({type(model).__name__}): {e}") from e
    with torch.no_grad():
        for wkey, (c, width) in codes.items():
            m: Any = model.get_submodule(wkey.rsplit(".", 1)[0] if "." in wkey else "")
            m.weight.copy_(m.weight_quant.decode(c, width))
    _attach(model, manifest, spec, config, subset)
    return model.eval()


def _attach(
    model: nn.Module,
    manifest: Mapping[str, Any],
    spec: QuantSpec,
    config: dict[str, int] | None,
    subset: tuple[int, ...] | None,
) -> None:
    """Set the loaded model's ``dbq_*`` attributes, each slim layer's kept bits, and its stored bit state."""
    setattr(model, PREPROCESSING_ATTR, manifest["preprocessing"])
    setattr(model, CLASS_NAMES_ATTR, None if manifest["class_names"] is None else list(manifest["class_names"]))
    setattr(model, CONFIG_ATTR, config)
    for q in iter_quantizers(model):
        kept = (config[q.name],) if config is not None else subset
        if kept is None or not q.weight_quant.has_codes:
            q.layer.__dict__.pop(AVAILABLE_BITS_ATTR, None)  # a model passed in again after a slim load
        else:
            setattr(q.layer, AVAILABLE_BITS_ATTR, kept)
    if config is not None:
        setattr(model, AVAILABLE_BITS_ATTR, tuple(sorted(set(config.values()), reverse=True)))
        set_bits(model, config)
    elif subset is not None:
        setattr(model, AVAILABLE_BITS_ATTR, subset)
        set_bits(model, subset[0])
    else:
        setattr(model, AVAILABLE_BITS_ATTR, tuple(spec.bits))
        set_bits(model, spec.high_bits)
