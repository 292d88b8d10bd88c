"""Shared builders for the reliability battery: a small real artifact and a re-signing editor for attacks that must
get past the checksum (so the *validation* behind it is what is tested)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lightning_dbq as dbq
from lightning_dbq.quant.artifact import _checksum

META = "lightning_dbq"


def make_artifact(folder: Path, bits: tuple[int, ...] = (8, 4, 2), name: str = "a.dbq.safetensors") -> Path:
    """A trained-like cifar_resnet20 (4 classes) artifact: scales initialised, rebuildable by name."""
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=list(bits), num_classes=4)
    model(torch.randn(4, 3, 8, 8))
    return dbq.save_int(model.eval(), folder / name)


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of an artifact, without any validation."""
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads((f.metadata() or {})[META])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return manifest, tensors


def resign(
    src: Path,
    dst: Path,
    edit_manifest: Callable[[dict[str, Any]], Any] | None = None,
    edit_tensors: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    raw_manifest: str | None = None,
) -> Path:
    """Copy ``src`` to ``dst`` after editing its manifest and/or tensors, with a *recomputed* valid checksum."""
    manifest, tensors = read(src)
    if edit_manifest is not None:
        edit_manifest(manifest)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if isinstance(manifest, dict) and "checksum" in manifest:
        with contextlib.suppress(TypeError, ValueError):  # a manifest JSON cannot hold: leave the old checksum
            manifest["checksum"] = _checksum(tensors, manifest)
    text = raw_manifest if raw_manifest is not None else json.dumps(manifest)
    save_file(tensors, str(dst), metadata={META: text})
    return dst


def codes_key(tensors: dict[str, torch.Tensor]) -> str:
    """The first packed-codes tensor's key."""
    return sorted(k for k in tensors if k.startswith("__codes__."))[0]


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-identical state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
