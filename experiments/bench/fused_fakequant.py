"""Candidate faster fake-quant kernels (proposals for ``lightning_dbq/quant/functional.py``, measured by P1).

Same maths as :func:`lightning_dbq.quant.functional.lsq_fake` /
:func:`~lightning_dbq.quant.functional.double_round_fake` (round-half-up, clip in ``h``-bit units before
rounding, STE, LSQ scale gradient times ``g``), but as one
``torch.autograd.Function`` each: the forward is 6 element-wise passes (3 in place) and saves the input, the
output (both kept alive anyway, by the ReLU/BN before and the convolution after) and a bool mask; the backward
makes both gradients in 4 passes with one reduction, instead of the ~25 autograd nodes (``where``/``gt``/``lt`` for
the clamp, ``neg``, ``sub``, two STE detach-adds, ...) of the composite version.

Gradients (``v = x / s``, ``c = clamp(v, lo, hi)``, ``q = step · rhu(rhu(c) / step)``, ``inside = lo < v < hi``, strict
as in the library):

* ``dL/dx = dL/dy · inside``;
* ``dL/ds = g · Σ dL/dy · (q − v·inside)`` (``q − v`` inside, the clip bound ``q`` outside), summed to ``s``'s shape;
  computed as ``g/s · Σ dL/dy · (y − x·inside)`` from the saved output ``y = s·q``.

:func:`compiled` wraps the composite library functions in ``torch.compile`` (Inductor C++ kernels) for comparison.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

import lightning_dbq.quant.quantizers as quantizers
from lightning_dbq.quant.functional import _check_bits, double_round_fake, lsq_fake, qrange

__all__ = ["compiled", "fused_double_round_fake", "fused_lsq_fake", "patched"]


class _FakeQuant(torch.autograd.Function):
    """``y = s · step · rhu(rhu(clamp(x / s, lo, hi)) / step)`` (``step = 1``: plain LSQ, one rounding)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, lo: float, hi: float, step: float, g: float) -> Tensor:  # noqa: D102
        q, _, inside = _quant(x, s, lo, hi, step)
        out = q.mul_(s)
        # x is kept alive by the layer before (ReLU / BN output) and out by the conv after: only the mask is new.
        ctx.save_for_backward(x, s, out, inside)
        ctx.g = g
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, s, out, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            u = torch.where(inside, out - x, out)  # = s·(q − v) inside, s·q (the clip bound) outside
            if s.numel() == 1:
                grad_s = (torch.dot(grad.reshape(-1), u.reshape(-1)) * (ctx.g / s)).reshape(s.shape)
            else:
                grad_s = u.mul_(grad).sum_to_size(s.shape).mul_(ctx.g).div_(s)
        return grad_x, grad_s, None, None, None, None


@functools.lru_cache(maxsize=256)
def _inner(lo: float, hi: float) -> tuple[float, float]:
    """The float32 neighbours just inside ``[lo, hi]``: clamping to them and comparing gives the *strict* mask
    ``lo < v < hi`` in one pass, and rounds to the same integers ``lo`` / ``hi``."""
    b = torch.tensor([lo, hi], dtype=torch.float32)
    inner = torch.nextafter(b, torch.tensor([hi, lo], dtype=torch.float32))
    return float(inner[0]), float(inner[1])


def _quant(x: Tensor, s: Tensor, lo: float, hi: float, step: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, v, inside)`` with ``q`` the de-scaled fake-quant value in ``h``-bit units and ``inside = lo < v < hi``."""
    v = x / s
    q = v.clamp(*_inner(lo, hi))
    inside = q == v
    q = q.add_(0.5).floor_()
    if step != 1.0:
        q = q.div_(step).add_(0.5).floor_().mul_(step)
    return q, v, inside


def fused_lsq_fake(x: Tensor, scale: Tensor, bits: int, signed: bool, g: float = 1.0) -> Tensor:
    """Drop-in for :func:`lightning_dbq.quant.functional.lsq_fake` (float32 inputs)."""
    lo, hi = qrange(bits, signed)
    out: Tensor = _FakeQuant.apply(x.float(), scale.float(), float(lo), float(hi), 1.0, g)
    return out.to(x.dtype)


def fused_double_round_fake(w: Tensor, scale: Tensor, high_bits: int, bits: int, g: float = 1.0) -> Tensor:
    """Drop-in for :func:`lightning_dbq.quant.functional.double_round_fake` (float32 inputs)."""
    step = float(1 << _check_bits(high_bits, bits))
    lo, hi = qrange(bits, signed=True)
    out: Tensor = _FakeQuant.apply(w.float(), scale.float(), lo * step, hi * step, step, g)
    return out.to(w.dtype)


def compiled() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """``torch.compile`` (dynamic shapes) of the library's composite ``lsq_fake`` and ``double_round_fake``.

    Weights are passed flattened (``(numel,)``, or ``(C, numel/C)`` with a per-channel scale): dynamo keeps the
    shapes of ``nn.Parameter`` inputs static, so passing the weights themselves recompiles for every layer shape and
    hits the recompile limit (8) after a few layers, silently falling back to eager for the rest.
    """
    act = torch.compile(lsq_fake, dynamic=True)
    weight = torch.compile(double_round_fake, dynamic=True)

    def weight_flat(w: Tensor, scale: Tensor, high_bits: int, bits: int, g: float = 1.0) -> Tensor:
        if scale.numel() == 1:
            return weight(w.reshape(-1), scale, high_bits, bits, g).view_as(w)
        flat = w.reshape(w.shape[0], -1)
        return weight(flat, scale.reshape(-1, 1), high_bits, bits, g).view_as(w)

    return act, weight_flat


@contextlib.contextmanager
def patched(act: Callable[..., Tensor], weight: Callable[..., Tensor]) -> Iterator[None]:
    """Temporarily route the quantizer modules' ``lsq_fake`` / ``double_round_fake`` calls to other kernels."""
    saved = quantizers.lsq_fake, quantizers.double_round_fake
    quantizers.lsq_fake, quantizers.double_round_fake = act, weight  # type: ignore[assignment]
    try:
        yield
    finally:
        quantizers.lsq_fake, quantizers.double_round_fake = saved  # type: ignore[assignment]
