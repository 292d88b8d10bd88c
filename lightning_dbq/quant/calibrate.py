"""``calibrate``: initialise every activation quantizer of a prepared model from a few batches (post-hoc use)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dbq.quant.prepare import bit_config, get_spec, set_bits
from lightning_dbq.quant.quantizers import ActQuantizer

__all__ = ["calibrate"]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, Any] | list[Any]]) -> nn.Module:
    """Run ``batches`` through ``model`` at every candidate bit so every activation quantizer is initialised.

    Quantizers that are already initialised keep their scales (only uninitialised ones take the first batch's
    statistics). The model's train/eval mode and bit configuration are restored; BatchNorm statistics are not
    updated (the passes run in eval mode).

    Args:
        model: a prepared model.
        batches: input tensors, or ``(inputs, targets, ...)`` tuples/lists (the first element is used).

    Returns:
        The same model.

    Raises:
        ValueError: the model is not prepared, or ``batches`` is empty.
    """
    spec = get_spec(model)
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not inputs:
        raise ValueError("calibrate(): `batches` is empty; give at least one input batch")
    saved, was_training = bit_config(model), model.training
    model.eval()
    try:
        for bits in spec.bits:
            set_bits(model, bits)
            for x in inputs:
                model(x)
    finally:
        set_bits(model, saved)
        model.train(was_training)
    cold = [n for n, m in model.named_modules() if isinstance(m, ActQuantizer) and not bool(m.initialized)]
    if cold:  # pragma: no cover - a quantizer the forward never reaches
        raise ValueError(f"calibrate(): activation quantizer(s) not reached by the forward: {cold[:5]}")
    return model
