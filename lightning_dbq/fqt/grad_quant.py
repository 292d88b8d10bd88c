"""Gradient estimators by name: ``GRAD_METHODS[name] = GradMethod(sample=..., channel=...)``.

Every estimator is a pure function ``fn(rows, bits, keep, generator) -> Tensor`` on a 2-D view ``(G, D)`` of ``gY``
whose rows are the groups: per-sample rows for the input gradient (``sample``), per-output-channel rows for the
weight gradient (``channel``). All but ``topk`` are unbiased: ``E[fn(rows)] = rows``. Add a method with
:func:`register_grad_method` (and its name to :data:`lightning_dbq.fqt.options.GRAD_METHOD_NAMES` for the CLI).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_dbq.fqt.bhq import householder_plan
from lightning_dbq.fqt.prune import group_weights, keep_count, topk_mask, water_fill
from lightning_dbq.fqt.quantizer import quantize_rows, quantize_tensor

__all__ = ["GRAD_METHODS", "Estimator", "GradMethod", "agp", "bhq", "psq", "ptq", "register_grad_method", "topk"]

Estimator = Callable[[Tensor, int, float, "torch.Generator | None"], Tensor]


class GradMethod(NamedTuple):
    """The estimators of one method: ``sample`` for the input-gradient path, ``channel`` for the weight path."""

    sample: Estimator
    channel: Estimator


def ptq(rows: Tensor, bits: int, keep: float, generator: torch.Generator | None) -> Tensor:
    """Per-tensor quantization: one group for the whole tensor (``keep`` unused)."""
    return quantize_tensor(rows, bits, generator)


def psq(rows: Tensor, bits: int, keep: float, generator: torch.Generator | None) -> Tensor:
    """Per-row (per-sample or per-channel) quantization (``keep`` unused)."""
    return quantize_rows(rows, bits, generator)


def bhq(rows: Tensor, bits: int, keep: float, generator: torch.Generator | None) -> Tensor:
    """Block Householder transform, per-row quantization, inverse transform (see :mod:`lightning_dbq.fqt.bhq`)."""
    if rows.numel() == 0:
        return rows.clone()
    plan = householder_plan(rows.amax(dim=1) - rows.amin(dim=1))
    return plan.invert(quantize_rows(plan.apply(rows), bits, generator))


def agp(rows: Tensor, bits: int, keep: float, generator: torch.Generator | None, *, rescale: bool = True) -> Tensor:
    """Unbiased group pruning + per-row quantization: ``ĝ_i = (m_i/p_i)·Q(g_i)``, ``m_i ~ Bernoulli(p_i)``.

    ``p`` is water-filled (``p ∝`` range, ``Σ p = keep·G``, see :func:`~lightning_dbq.fqt.prune.water_fill`); the
    mask is drawn before the rounding noise, from the same generator. ``keep >= 1`` is exactly :func:`psq`.
    ``rescale=False`` drops the ``1/p`` factor (a deliberately biased estimator, for tests and studies).
    """
    if keep >= 1.0 or rows.numel() == 0:
        return quantize_rows(rows, bits, generator)
    p = water_fill(group_weights(rows), keep_count(rows.shape[0], keep))
    u = torch.rand(p.shape, generator=generator, device=rows.device, dtype=torch.float64)
    kept = u < p
    factor = torch.where(kept, (1.0 / p if rescale else torch.ones_like(p)), torch.zeros_like(p))
    return quantize_rows(rows, bits, generator) * factor.to(rows.dtype)[:, None]


def topk(rows: Tensor, bits: int, keep: float, generator: torch.Generator | None) -> Tensor:
    """The public 1-bit-FQT code's pruning: quantize every row, keep the top ``int(G·keep)`` by ``max|g|``, no
    rescale (biased)."""
    q = quantize_rows(rows, bits, generator)
    if keep >= 1.0 or rows.numel() == 0:
        return q
    return q * topk_mask(rows, keep).to(rows.dtype)[:, None]


GRAD_METHODS: dict[str, GradMethod] = {}


def register_grad_method(name: str, sample: Estimator, channel: Estimator | None = None) -> None:
    """Register ``name``: ``sample`` quantizes per-sample rows of ``gY`` (input gradient), ``channel`` per-channel
    rows (weight gradient, default: ``sample``).

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in GRAD_METHODS:
        raise ValueError(f"gradient method {name!r} is already registered; registered: {sorted(GRAD_METHODS)}")
    GRAD_METHODS[name] = GradMethod(sample, channel or sample)


register_grad_method("ptq", ptq)
register_grad_method("psq", psq)
register_grad_method("bhq", bhq, psq)  # as StatQuant: BHQ on the sample path, per-channel groups for gW
register_grad_method("agp", agp)
register_grad_method("topk", topk)
