"""The integer artifact: ``*.dbq.safetensors`` (DESIGN.md section 5).

Contents: the ``h``-bit integer codes of every quantized weight (packed into nibbles/crumbs when ``h <= 4``),
every other tensor of the state dict as is (FP first/last layers, biases, per-bit norms, weight scales, per-bit
activation scales), and a JSON manifest in the safetensors header: format name and version, bit list, the
:class:`QuantSpec`, the model source (timm name + kwargs), the layer list and a SHA-256 checksum of all tensors.
No pickle anywhere; writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_dbq.quant.layers import DBQLayer
from lightning_dbq.quant.packing import pack_codes, pack_width, unpack_codes
from lightning_dbq.quant.prepare import get_spec, prepare
from lightning_dbq.quant.spec import QuantSpec

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_int", "read_manifest", "save_int"]

FORMAT_NAME = "lightning_dbq.int"
FORMAT_VERSION = 1
_META_KEY = "lightning_dbq"
_CODES_PREFIX = "__codes__."
SOURCE_ATTR = "_dbq_source"


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


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_int(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the integer artifact of a prepared model.

    Args:
        model: a model prepared with :func:`lightning_dbq.prepare` (in any bit state; nothing is changed).
        path: output path (``.dbq.safetensors`` by convention).
        model_name: timm name to rebuild the model with; default: the name recorded by
            :func:`lightning_dbq.create_model` / ``DBQModule``, else ``pretrained_cfg['architecture']``.
        model_kwargs: kwargs for ``timm.create_model`` (e.g. ``num_classes``).
        extra: any JSON-serialisable metadata to keep in the manifest (e.g. accuracies).

    Returns:
        The written path.
    """
    spec = get_spec(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    coded: set[str] = set()
    for name, m in model.named_modules():
        if not isinstance(m, DBQLayer):
            continue
        key = f"{name}.weight" if name else "weight"
        if spec.weight_mode == "unshared":  # baseline "Ours*": no shared codes, FP32 weights stay in `state`
            layers.append({"name": name, "shape": list(m.weight.shape), "numel": m.weight.numel(), "storage_bits": 32})
            continue
        codes = m.weight_quant.codes(m.weight.detach()).cpu()
        tensors[_CODES_PREFIX + key] = pack_codes(codes, spec.high_bits).contiguous()
        coded.add(key)
        layers.append(
            {
                "name": name,
                "shape": list(codes.shape),
                "numel": codes.numel(),
                "storage_bits": pack_width(spec.high_bits),
            }
        )
    for k, v in state.items():
        if k not in coded:
            tensors[k] = v.contiguous().clone()
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "bits": list(spec.bits),
        "spec": spec.to_dict(),
        "model": _model_source(model, model_name, model_kwargs),
        "layers": layers,
        "checksum": _checksum(tensors),
        "extra": dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(manifest)})
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600: a server running as another user could not read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _file_mode() -> int:
    """``0o666`` minus the process umask (what ``open()`` would have given a new file)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the manifest of an artifact (no tensors are loaded).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file (truncated/corrupt), or not a lightning_dbq artifact, or an
            unsupported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_int: no such artifact file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"load_int: {path} is not a readable safetensors file (truncated or corrupt): {e}") from e
    if _META_KEY not in meta:
        raise ValueError(
            f"load_int: {path} is a safetensors file but not a lightning_dbq artifact "
            f"(no '{_META_KEY}' manifest in its header)"
        )
    manifest: dict[str, Any] = json.loads(meta[_META_KEY])
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"load_int: {path} has format {manifest.get('format')!r} version {manifest.get('version')!r};"
            f" this lightning_dbq reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = f.get_tensor(k)
        return out
    except Exception as e:
        raise ValueError(f"load_int: {path} could not be read (truncated or corrupt): {e}") from e


def load_int(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a bit-switchable model from an integer artifact, ready for :func:`lightning_dbq.set_bits`.

    Args:
        path: a ``*.dbq.safetensors`` file written by :func:`save_int`.
        model: an *unprepared* model of the right architecture, for models that timm cannot build by name;
            by default the model is built with ``timm.create_model(name, pretrained=False, **kwargs)``.

    Returns:
        The model in eval mode at the highest bit; its float weights equal ``q_h · s_h`` so every bit reproduces
        the saved model exactly.

    Raises:
        ValueError: corrupt/truncated/altered file, not an artifact, or no way to build the model.
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensors = _load_tensors(path)
    if _checksum(tensors) != manifest["checksum"]:
        raise ValueError(f"load_int: checksum mismatch in {path}: tensors were altered after saving")
    spec = QuantSpec.from_dict(manifest["spec"])
    if model is None:
        name = manifest["model"]["name"]
        if not name:
            raise ValueError(f"load_int: {path} records no model name; pass `model=` (an unprepared instance)")
        import timm

        import lightning_dbq.models  # noqa: F401  (registers cifar_resnet*)

        model = timm.create_model(name, pretrained=False, **manifest["model"]["kwargs"])
        setattr(model, SOURCE_ATTR, {"name": name, "kwargs": dict(manifest["model"]["kwargs"])})
    prepare(model, **spec.to_dict())
    state: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if not k.startswith(_CODES_PREFIX)}
    coded = [layer for layer in manifest["layers"] if layer["storage_bits"] != 32]
    for layer in coded:  # placeholders: the weights are decoded below, once the scales are loaded
        name = layer["name"]
        key = f"{name}.weight" if name else "weight"
        state[key] = torch.zeros_like(model.get_submodule(name).weight)  # type: ignore[arg-type]
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        for layer in coded:
            name = layer["name"]
            key = f"{name}.weight" if name else "weight"
            codes = unpack_codes(tensors[_CODES_PREFIX + key], spec.high_bits, layer["numel"]).reshape(layer["shape"])
            m: Any = model.get_submodule(name)
            m.weight.copy_(codes.float() * m.weight_quant.effective_scale().float())
    return model.eval()
