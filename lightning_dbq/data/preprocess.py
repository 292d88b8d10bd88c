"""Serving-side image preprocessing from an artifact's ``preprocessing`` record (no lightning import).

>>> import torch
>>> from lightning_dbq.data.preprocess import apply_preprocessing
>>> pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 4, "interpolation": "bilinear",
...        "channels": 3}
>>> apply_preprocessing(torch.full((3, 8, 8), 255, dtype=torch.uint8), pre)[0, 0, 0].item()
2.0

The record (``model.dbq_preprocessing`` of a loaded artifact, or a data module's ``preprocessing``) is what the data
modules do to evaluation images: resize the shorter side to ``image_size`` and center-crop a square (``interpolation``
bilinear / bicubic antialiased, or nearest; ``"none"``: never resized, the input must already be ``image_size``
square), scale to ``[0, 1]`` and normalise per channel, ``(x - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lightning_dbq.quant.artifact_check import check_preprocessing

__all__ = ["apply_preprocessing"]

_MODES = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def apply_preprocessing(images: Tensor | np.ndarray[Any, Any], preprocessing: Mapping[str, Any]) -> Tensor:
    """Turn raw images into model inputs as the training data module did.

    Steps, in the data modules' order: resize the shorter side to ``image_size`` and center-crop a square (skipped
    when the image is already ``image_size`` square; uint8 images are resized as uint8, like the data modules do);
    uint8 → float32 in ``[0, 1]`` (``· 1/255``; float input is taken to be in ``[0, 1]`` already and only cast to
    float32); ``(x - mean) / std`` per channel.

    Args:
        images: one ``(C, H, W)`` image or a ``(N, C, H, W)`` batch, channels first, uint8 (0..255) or floating
            point (0..1); a NumPy array is converted with ``torch.from_numpy``. PIL images: convert first with
            ``torchvision.transforms.v2.functional.pil_to_tensor``; a grey image for a 3-channel model: repeat it,
            e.g. ``x.expand(3, -1, -1)``.
        preprocessing: ``{mean, std, image_size, interpolation, channels}`` (validated).

    Returns:
        A float32 tensor shaped ``(C, image_size, image_size)`` or ``(N, C, image_size, image_size)``.

    Raises:
        ValueError: an invalid ``preprocessing`` record (naming the key), an input that is not 3-D / 4-D, whose
            channel count differs from ``channels``, of another dtype than uint8 / floating point, or not
            ``image_size`` square when ``interpolation`` is ``"none"``.
    """
    pre = check_preprocessing("apply_preprocessing", preprocessing)
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"apply_preprocessing: images must be (C, H, W) or (N, C, H, W), got {shape}")
    if x.shape[-3] != pre["channels"]:
        raise ValueError(f"apply_preprocessing: images have {x.shape[-3]} channel(s) (dim -3, channels first), the "
                         f"model expects channels={pre['channels']}")  # fmt: skip
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"apply_preprocessing: images must be uint8 (0..255) or floating point (0..1), got {x.dtype}")
    size = pre["image_size"]
    if tuple(x.shape[-2:]) != (size, size):
        if pre["interpolation"] == "none":
            raise ValueError(
                f"apply_preprocessing: images are {tuple(x.shape[-2:])} but interpolation='none' needs {size}x{size} "
                "inputs (the model was trained on images that were never resized)"
            )
        mode = _MODES[pre["interpolation"]]
        x = TF.center_crop(TF.resize(x, [size], interpolation=mode, antialias=True), [size, size])
    x = x.float().mul(1.0 / 255) if x.dtype == torch.uint8 else x.float()  # v2.ToDtype(scale=True)'s arithmetic
    shape = (-1, 1, 1)
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(shape)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(shape)
    return (x - mean) / std
