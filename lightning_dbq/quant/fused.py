"""Fused fake-quant kernels: the maths of :func:`~lightning_dbq.quant.functional.lsq_fake` and
:func:`~lightning_dbq.quant.functional.double_round_fake` as one ``torch.autograd.Function`` each.

The composite functions build ~25 autograd nodes per quantized tensor (``where``/``gt``/``lt`` for the clamp, two
straight-through detach-adds, the gradient-scale trick, ...). Here the forward is one allocation and 5 in-place
element-wise passes, and saves only the input and the scale (the input is usually kept alive anyway, by the layer
before); the backward rebuilds ``v = x / s``, the mask and the output from them (~8 passes, one reduction), so a
quantizer adds no full-size tensor to what a training step keeps (docs/memory.md).

The forward is bit-identical to the composite functions (same operations in the same float32 order:
``q_l·2^k`` is exact, so ``(q_l·2^k)·s == q_l·(2^k·s)``); the gradients agree up to float32 rounding of the
scale-gradient sum. With ``v = x / s``, ``inside = lo < v < hi`` (strict, as ``torch.clamp``'s gradient):

* ``dL/dx = dL/dy · inside``;
* ``dL/ds = g · Σ dL/dy · (q − v·inside)`` (``q − v`` inside, the clip bound outside), summed to ``s``'s shape;
  computed as ``g/s · Σ dL/dy · (y − x·inside)`` from the rebuilt output ``y = s·q``.

The backward is itself differentiable (only out-of-place ops, and ``y`` rebuilt with its own straight-through graph,
when ``create_graph=True``), so Hessian-vector products through fused layers work (``lightning_dbq.search.hessian``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_dbq.quant.functional import MAX_BITS, MIN_BITS, _check_bits, qrange

__all__ = ["fused_double_round_fake", "fused_lsq_fake"]


def _inner(lo: float, hi: float) -> tuple[float, float]:
    """The float32 neighbours just inside ``[lo, hi]``: they round (half up) to the same integers ``lo`` / ``hi``
    (clamping to them instead of to ``lo`` / ``hi`` gives the same codes)."""
    lo32, hi32 = np.float32(lo), np.float32(hi)  # plain NumPy scalars: no tensor, no graph break under dynamo
    return float(np.nextafter(lo32, hi32)), float(np.nextafter(hi32, lo32))


def _codes_(v: Tensor, lo: float, hi: float, step: float) -> Tensor:
    """``step · rhu(rhu(clamp(v, lo, hi)) / step)``, computed in place in ``v`` (which it returns)."""
    q = v.clamp_(*_inner(lo, hi)).add_(0.5).floor_()
    if step != 1.0:
        q = q.div_(step).add_(0.5).floor_().mul_(step)
    return q


def _strictly_inside(v: Tensor, lo: float, hi: float) -> Tensor:
    """The bool mask ``lo < v < hi`` (``False`` for NaN), the straight-through window of ``torch.clamp``."""
    return v.gt(lo).logical_and_(v.lt(hi))


def _scale_grad(grad: Tensor, u: Tensor, s: Tensor, g: float) -> Tensor:
    """``g/s · Σ grad · u`` summed to ``s``'s shape (``u`` is overwritten unless grad mode is on)."""
    if s.numel() == 1:
        return (torch.dot(grad.reshape(-1), u.reshape(-1)) * (g / s)).reshape(s.shape)
    if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
        return (u * grad).sum_to_size(s.shape) * g / s
    return u.mul_(grad).sum_to_size(s.shape).mul_(g).div_(s)


class _FakeQuant(torch.autograd.Function):
    """``y = s · step · rhu(rhu(clamp(x / s, lo, hi)) / step)`` (``step = 1``: plain LSQ, one rounding).

    Saves ``x`` and ``s`` only; the backward rebuilds ``v = x / s``, the mask and ``y`` from them.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, lo: float, hi: float, step: float, g: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, s)
        ctx.consts = (lo, hi, step, g)
        return _codes_(x / s, lo, hi, step).mul_(s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, s = ctx.saved_tensors
        lo, hi, step, g = ctx.consts
        v = x / s
        inside = _strictly_inside(v, lo, hi)
        grad_s = None
        if ctx.needs_input_grad[1]:  # first, so that its temporaries are gone before grad_x is allocated
            if torch.is_grad_enabled():  # create_graph=True: y with its own (straight-through) graph
                y = _FakeQuant.apply(x, s, lo, hi, step, g)
                u = torch.where(inside, y - x, y)
            else:  # y rebuilt in v's buffer; y − x inside, y (the clip bound) outside, as torch.where(...) above
                u = _codes_(v, lo, hi, step).mul_(s).sub_(torch.where(inside, x, 0.0))
            del v
            grad_s = _scale_grad(grad, u, s, g)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        return grad_x, grad_s, None, None, None, None


def fused_lsq_fake(x: Tensor, scale: Tensor, bits: int, signed: bool, g: float = 1.0) -> Tensor:
    """Fused :func:`~lightning_dbq.quant.functional.lsq_fake`: same forward bit for bit, same gradients."""
    if not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    lo, hi = qrange(bits, signed)
    out: Tensor = _FakeQuant.apply(x.float(), scale.float(), float(lo), float(hi), 1.0, g)
    return out.to(x.dtype)


def fused_double_round_fake(w: Tensor, scale: Tensor, high_bits: int, bits: int, g: float = 1.0) -> Tensor:
    """Fused :func:`~lightning_dbq.quant.functional.double_round_fake`: same forward bit for bit, same gradients."""
    step = float(1 << _check_bits(high_bits, bits))
    lo, hi = qrange(bits, signed=True)
    out: Tensor = _FakeQuant.apply(w.float(), scale.float(), lo * step, hi * step, step, g)
    return out.to(w.dtype)
