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

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_dbq.quant.functional import MAX_BITS, MIN_BITS, _check_bits, qrange

__all__ = [
    "Window",
    "double_round_window",
    "fused_double_round_fake",
    "fused_lsq_fake",
    "keep_for_backward",
    "lsq_window",
    "operand_grads_",
    "rebuild",
]


class Window(NamedTuple):
    """The constants of one fake quantizer: ``y = s · step · rhu(rhu(clamp(x / s, lo, hi)) / step)`` with gradient
    scale ``g`` (``step = 1``: plain LSQ)."""

    lo: float
    hi: float
    step: float
    g: float


def lsq_window(bits: int, signed: bool, g: float = 1.0) -> Window:
    """The :class:`Window` of :func:`fused_lsq_fake` ``(·, ·, bits, signed, g)``."""
    if not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    lo, hi = qrange(bits, signed)
    return Window(float(lo), float(hi), 1.0, g)


def double_round_window(high_bits: int, bits: int, g: float = 1.0) -> Window:
    """The :class:`Window` of :func:`fused_double_round_fake` ``(·, ·, high_bits, bits, g)``."""
    step = float(1 << _check_bits(high_bits, bits))
    lo, hi = qrange(bits, signed=True)
    return Window(lo * step, hi * step, step, g)


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

    Saves ``x`` and ``s`` only; the backward rebuilds ``v = x / s``, the mask and ``y`` from them. Inside
    :func:`keep_for_backward` it also saves ``y`` and the mask (the backward then skips rebuilding them).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, lo: float, hi: float, step: float, g: float) -> Tensor:  # noqa: D102
        ctx.consts = (lo, hi, step, g)
        if not _keeping():
            ctx.save_for_backward(x, s)
            return _codes_(x / s, lo, hi, step).mul_(s)
        v = x / s
        q = v.clamp(*_inner(lo, hi))
        inside = q == v  # the clamp to the inner bounds keeps exactly the v with lo < v < hi
        del v
        out = _codes_(q, lo, hi, step).mul_(s)
        ctx.save_for_backward(x, s, out, inside)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, s, *kept = ctx.saved_tensors
        lo, hi, step, g = ctx.consts
        if kept:
            y, inside = kept
        else:
            v = x / s
            inside = _strictly_inside(v, lo, hi)
        grad_s = None
        if ctx.needs_input_grad[1]:  # first, so that its temporaries are gone before grad_x is allocated
            if torch.is_grad_enabled():  # create_graph=True: y with its own (straight-through) graph
                y = _FakeQuant.apply(x, s, lo, hi, step, g)
                u = torch.where(inside, y - x, y)
            elif kept:  # −(x inside, 0 outside) + y: y − x inside, y (the clip bound) outside, as torch.where above
                u = torch.where(inside, x, 0.0).neg_().add_(y)
            else:  # the same with y rebuilt in v's buffer
                u = _codes_(v, lo, hi, step).mul_(s).sub_(torch.where(inside, x, 0.0))
            grad_s = _scale_grad(grad, u, s, g)
            del u
        grad_x = grad * inside.to(grad.dtype) if ctx.needs_input_grad[0] else None  # float · float: see operand_grads_
        return grad_x, grad_s, None, None, None, None


_KEEP = threading.local()


@contextlib.contextmanager
def keep_for_backward() -> Iterator[None]:
    """Within the block (this thread), fused fake-quant nodes also save their output and mask.

    For graphs that live only inside a backward pass (:mod:`lightning_dbq.quant.recompute` rebuilds a quantized
    operand and differentiates it right away): there keeping them is nearly free and spares the backward from
    rebuilding them. Same values either way.
    """
    before = getattr(_KEEP, "on", False)
    _KEEP.on = True
    try:
        yield
    finally:
        _KEEP.on = before


def _keeping() -> bool:
    """Inside :func:`keep_for_backward` (never while ``torch.compile`` traces)."""
    return not torch.compiler.is_compiling() and bool(getattr(_KEEP, "on", False))


def fused_lsq_fake(x: Tensor, scale: Tensor, bits: int, signed: bool, g: float = 1.0) -> Tensor:
    """Fused :func:`~lightning_dbq.quant.functional.lsq_fake`: same forward bit for bit, same gradients."""
    out: Tensor = _FakeQuant.apply(x.float(), scale.float(), *lsq_window(bits, signed, g))
    return out.to(x.dtype)


def fused_double_round_fake(w: Tensor, scale: Tensor, high_bits: int, bits: int, g: float = 1.0) -> Tensor:
    """Fused :func:`~lightning_dbq.quant.functional.double_round_fake`: same forward bit for bit, same gradients."""
    out: Tensor = _FakeQuant.apply(w.float(), scale.float(), *double_round_window(high_bits, bits, g))
    return out.to(w.dtype)


def rebuild(x: Tensor, s: Tensor, window: Window) -> tuple[Tensor, Tensor]:
    """The fake-quantized ``y`` (the forward's values bit for bit) and the mask ``lo < x / s < hi``, without a graph:
    one float and one bool allocation (float32 ``x`` and ``s``)."""
    lo, hi, step, _ = window
    v = x / s
    inside = _strictly_inside(v, lo, hi)
    return _codes_(v, lo, hi, step).mul_(s), inside


def operand_grads_(
    grad: Tensor, y: Tensor, inside: Tensor, x: Tensor, s: Tensor, window: Window, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of ``(x, s)`` given ``grad = dL/dy`` and :func:`rebuild`'s ``(y, inside)``, as the fused
    backward computes them (same values bit for bit), in place: ``grad`` becomes ``dL/dx`` and ``y`` is overwritten
    (one allocation: the mask as float32). Grad mode must be off (a backward without ``create_graph``). For finite
    ``x``: an infinite input (outside the window) makes the scale gradient NaN here, where the fused backward ignores
    it."""
    # the mask as float32 0/1: float · bool takes PyTorch's mixed-dtype path, several times slower than a float pass
    # on CPU (one float copy of the mask is cheaper than two such passes)
    mask = inside.to(grad.dtype)
    grad_s = None
    if needs[1]:  # y − x inside, y outside (x·0 = ±0 leaves y as it is), then Σ grad · u to s's shape
        grad_s = _scale_grad(grad, y.addcmul_(x, mask, value=-1.0), s, window.g)
    return (grad.mul_(mask) if needs[0] else None), grad_s
