"""``create_model``: timm model by name, prepared for bit switching, with its source recorded for artifacts."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_dbq.quant.artifact import SOURCE_ATTR
from lightning_dbq.quant.prepare import prepare

__all__ = ["close_model_names", "create_fp_model", "create_model"]


def close_model_names(name: str, n: int = 5) -> list[str]:
    """Registered timm model names closest to ``name`` (``difflib.get_close_matches``), best first.

    The candidates are every name in ``timm.list_models()`` (lightning_dbq's ``cifar_resnet*`` included).

    Example:
        >>> close_model_names("mobilenetv3_smal_100")[0]
        'mobilenetv3_small_100'
    """
    import timm

    import lightning_dbq.models  # noqa: F401  (registers cifar_resnet*)

    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6)


def create_fp_model(name: str, **model_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **model_kwargs)`` with lightning_dbq's models registered.

    Raises:
        ValueError: unknown model name (the message suggests the closest registered names).
    """
    import timm

    import lightning_dbq.models  # noqa: F401  (registers cifar_resnet*)

    if not timm.is_model(name):
        close = close_model_names(name)
        hint = f"did you mean {close[0]!r}? (close timm names: {close})" if close else "see timm.list_models()"
        raise ValueError(f"unknown model name {name!r}; {hint}")
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
