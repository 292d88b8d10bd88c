"""Fused fake-quant kernels: the maths of :func:`~lightning_dbq.quant.functional.lsq_fake` and
:func:`~lightning_dbq.quant.functional.double_round_fake` as one ``torch.autograd.Function`` each.

The composite functions build ~25 autograd nodes per quantized tensor (``where``/``gt``/``lt`` for the clamp, two
straight-through detach-adds, the gradient-scale trick, ...). Here the forward is 6 element-wise passes (3 in
place) and saves the input, the output (both kept alive anyway: by the layer before and by the convolution after)
and a bool mask; the backward makes both gradients in 4 passes and one reduction.

The forward is bit-identical to the composite functions (same operations in the same float32 order:
``q_l·2^k`` is exact, so ``(q_l·2^k)·s == q_l·(2^k·s)``); the gradients agree up to float32 rounding of the
scale-gradient sum. With ``v = x / s``, ``inside = lo < v < hi`` (strict, as ``torch.clamp``'s gradient):

* ``dL/dx = dL/dy · inside``;
* ``dL/ds = g · Σ dL/dy · (q − v·inside)`` (``q − v`` inside, the clip bound outside), summed to ``s``'s shape;
  computed as ``g/s · Σ dL/dy · (y − x·inside)`` from the saved output ``y = s·q``.

The backward is itself differentiable (only out-of-place ops when ``create_graph=True``), so Hessian-vector
products through fused layers work (``lightning_dbq.search.hessian``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_dbq.quant.functional import MAX_BITS, MIN_BITS, _check_bits, qrange

__all__ = ["fused_double_round_fake", "fused_lsq_fake"]


def _inner(lo: float, hi: float) -> tuple[float, float]:
    """The float32 neighbours just inside ``[lo, hi]``: clamping to them and comparing gives the *strict* mask
    ``lo < v < hi`` in one pass, and they round (half up) to the same integers ``lo`` / ``hi``."""
    lo32, hi32 = np.float32(lo), np.float32(hi)  # plain NumPy scalars: no tensor, no graph break under dynamo
    return float(np.nextafter(lo32, hi32)), float(np.nextafter(hi32, lo32))


class _FakeQuant(torch.autograd.Function):
    """``y = s · step · rhu(rhu(clamp(x / s, lo, hi)) / step)`` (``step = 1``: plain LSQ, one rounding)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, lo: float, hi: float, step: float, g: float) -> Tensor:  # noqa: D102
        v = x / s
        q = v.clamp(*_inner(lo, hi))
        inside = q == v
        del v
        q = q.add_(0.5).floor_()
        if step != 1.0:
            q = q.div_(step).add_(0.5).floor_().mul_(step)
        out = q.mul_(s)
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
            elif torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
                grad_s = (u * grad).sum_to_size(s.shape) * ctx.g / s
            else:
                grad_s = u.mul_(grad).sum_to_size(s.shape).mul_(ctx.g).div_(s)
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
