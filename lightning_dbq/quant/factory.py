"""``create_model``: timm model by name, prepared for bit switching, with its source recorded for artifacts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_dbq.quant.artifact import SOURCE_ATTR
from lightning_dbq.quant.prepare import prepare

__all__ = ["create_model", "create_fp_model"]


def create_fp_model(name: str, **model_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **model_kwargs)`` with lightning_dbq's models registered.

    Raises:
        ValueError: unknown model name (the message lists close matches).
    """
    import timm

    import lightning_dbq.models  # noqa: F401  (registers cifar_resnet*)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model name {name!r}; close timm names: {close}")
    if model_kwargs.get("pretrained"):
        raise ValueError("pretrained=True is not supported: nothing downloads at run time; load weights yourself")
    model_kwargs.pop("pretrained", None)
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    setattr(model, SOURCE_ATTR, {"name": name, "kwargs": dict(model_kwargs)})
    return model


def create_model(
    name: str,
    bits: Sequence[int] = (8, 6, 4, 2),
    quant: Mapping[str, Any] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a timm model and :func:`~lightning_dbq.prepare` it.

    Args:
        name: any timm model name (``resnet18``, ``cifar_resnet20``, ...).
        bits: candidate bits.
        quant: other :func:`~lightning_dbq.prepare` options (``per_channel``, ``quantize_first``, ...).
        **model_kwargs: passed to ``timm.create_model`` and recorded for :func:`~lightning_dbq.load_int`.
    """
    return prepare(create_fp_model(name, **model_kwargs), bits, **dict(quant or {}))
