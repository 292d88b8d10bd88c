"""Writers of ``dbq-export``'s formats: one bit configuration of a bit-switchable model to a deployable file.

Each writer has the signature ``fn(model, config, path, *, example_input, onnx_mode, preprocessing, class_names,
calibration) -> Path`` and is registered by name in :data:`lightning_dbq.search.options.EXPORT_FORMATS`:

* ``onnx``: :func:`lightning_dbq.export.export_onnx` (int8 QDQ graph; ``onnx_mode`` is passed through, with the
  ``calibration`` batches in ``integer`` mode);
* ``torchscript``: ``torch.jit.trace`` of :func:`lightning_dbq.freeze` at the configuration, ``torch.jit.save``;
* ``dbq``: a slim int artifact holding that configuration (``save_int(..., bits=config)``) with its
  preprocessing and class names.

Pure torch (no Lightning, no Hydra).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "align_normalization",
    "calibration_inputs",
    "data_class_names",
    "data_preprocessing",
    "example_input",
    "input_shape",
    "normalization_differs",
    "write_dbq",
    "write_onnx",
    "write_torchscript",
]

Config = int | Mapping[str, int]


def input_shape(preprocessing: Mapping[str, Any] | None, channels: int, image_size: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of one model input: the artifact's preprocessing when present, else ``channels``/``image_size``."""
    if preprocessing:
        size = int(preprocessing["image_size"])
        return int(preprocessing["channels"]), size, size
    return int(channels), int(image_size), int(image_size)


def example_input(shape: Sequence[int], batch: int = 1, seed: int = 0) -> Tensor:
    """A seeded standard-normal batch of ``shape`` (what a normalised image looks like) for tracing."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen)


def write_onnx(
    model: nn.Module,
    config: Config,
    path: str | os.PathLike[str],
    *,
    example_input: Tensor,
    onnx_mode: str = "exact",
    preprocessing: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    calibration: Sequence[Tensor] | None = None,
) -> Path:
    """ONNX file of ``config`` (:func:`lightning_dbq.export.export_onnx` with ``mode=onnx_mode``; ``calibration``:
    the preprocessed input batches ``mode="integer"`` calibrates its added 8-bit edges on)."""
    from lightning_dbq.export import export_onnx

    plain = dict(config) if isinstance(config, Mapping) else config
    if onnx_mode == "integer":
        return export_onnx(model, plain, path, example_input, mode=onnx_mode, calibration_data=calibration)
    return export_onnx(model, plain, path, example_input, mode=onnx_mode)


def write_torchscript(
    model: nn.Module,
    config: Config,
    path: str | os.PathLike[str],
    *,
    example_input: Tensor,
    onnx_mode: str = "exact",
    preprocessing: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    calibration: Sequence[Tensor] | None = None,
) -> Path:
    """TorchScript file of ``config``: ``torch.jit.trace(freeze(model, config))``, written atomically."""
    from lightning_dbq.quant.convert import freeze

    frozen = freeze(model, dict(config) if isinstance(config, Mapping) else config)
    with torch.no_grad():
        traced = torch.jit.trace(frozen, example_input)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.jit.save(traced, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def write_dbq(
    model: nn.Module,
    config: Config,
    path: str | os.PathLike[str],
    *,
    example_input: Tensor,
    onnx_mode: str = "exact",
    preprocessing: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    calibration: Sequence[Tensor] | None = None,
) -> Path:
    """A slim int artifact holding ``config``: ``save_int(model, path, bits=config, preprocessing=, class_names=)``."""
    from lightning_dbq.quant.artifact import save_int

    return save_int(model, path, bits=dict(config) if isinstance(config, Mapping) else config,
                    preprocessing=preprocessing, class_names=class_names)  # fmt: skip


def data_preprocessing(datamodule: Any) -> dict[str, Any] | None:
    """A data module's ``preprocessing`` record, or ``None`` when it does not describe one (or cannot yet)."""
    try:
        value = datamodule.preprocessing
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return dict(value) if isinstance(value, Mapping) else None


def data_class_names(datamodule: Any) -> list[str] | None:
    """A data module's ``class_names``, or ``None`` when it does not name its classes (or cannot yet)."""
    try:
        value = datamodule.class_names
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return [str(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else None


def align_normalization(
    batches: Sequence[tuple[Tensor, Tensor]], artifact: Mapping[str, Any] | None, data: Mapping[str, Any] | None
) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Any], str | None]:
    """Batches normalised the way the artifact expects, a record of what was done, and a warning (or ``None``).

    No artifact preprocessing: the data's batches as they are. The artifact's and the data's normalisation differ:
    the batches are re-normalised to the artifact's and the warning names both. The data module describes none:
    the batches are used as they are and the warning says so.
    """
    record: dict[str, Any] = {"used": "artifact" if artifact else "data", "artifact": artifact, "data": data,
                              "renormalized": False}  # fmt: skip
    if artifact is None:
        return list(batches), record, None
    if data is None:
        message = (f"PREPROCESSING UNKNOWN: the artifact expects mean={artifact['mean']} std={artifact['std']} but "
                   "the data module does not describe its normalisation; its batches are used as they are")  # fmt: skip
        return list(batches), record, message
    if not normalization_differs(artifact, data):
        return list(batches), record, None
    from lightning_dbq.search.bench import renormalize

    record["renormalized"] = True
    message = (f"PREPROCESSING MISMATCH: the artifact was trained with mean={artifact['mean']} std={artifact['std']}, "
               f"the data config normalises with mean={data['mean']} std={data['std']}; using the artifact's (the "
               "data's batches are re-normalised)")  # fmt: skip
    return renormalize(batches, data["mean"], data["std"], artifact["mean"], artifact["std"]), record, message


def calibration_inputs(
    datamodule: Any, preprocessing: Mapping[str, Any] | None, num_images: int = 256, batch_size: int = 64
) -> list[Tensor]:
    """Un-augmented training images of ``datamodule`` (its ``calibration_batches``, never the test split),
    normalised as ``preprocessing`` (an artifact's) expects: what ``export_onnx(mode="integer")`` calibrates on."""
    batches = datamodule.calibration_batches(num_images=num_images, batch_size=batch_size)
    aligned, _, _ = align_normalization(batches, preprocessing, data_preprocessing(datamodule))
    return [x for x, _ in aligned]


def normalization_differs(a: Mapping[str, Any], b: Mapping[str, Any], rel: float = 1e-5) -> bool:
    """Whether two preprocessing records normalise differently (``mean`` / ``std`` beyond ``rel``)."""
    for key in ("mean", "std"):
        x, y = [float(v) for v in a[key]], [float(v) for v in b[key]]
        if len(x) != len(y) or any(abs(p - q) > rel * max(abs(p), abs(q), 1e-12) for p, q in zip(x, y, strict=True)):
            return True
    return False
