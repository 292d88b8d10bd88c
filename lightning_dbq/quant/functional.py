"""Pure quantization math: round-half-up with STE, Double Rounding and LSQ fake-quant.

Every function here is a pure function of its tensor arguments (no module state). All arithmetic runs in
float32, also under ``torch.autocast`` (element-wise ops are not down-cast by autocast, and inputs are cast up
explicitly), and the result is returned in the input's dtype.

Conventions (see docs/math.md §1 and §2):

* rounding is round-half-up, ``floor(x + 0.5)``, never ``torch.round`` (half-to-even), so that the float path is
  bit-identical to the deployed integer shift ``(q_h + 2^(k-1)) >> k``;
* signed ranges are ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ranges ``[0, 2^b - 1]``;
* the LSQ gradient scale is ``g = 1 / sqrt(N * Q_P)``; for Double Rounding weights ``Q_P = Q_P(h)`` of the *stored*
  (highest) precision, so the scale's effective learning rate does not depend on the active bit and the per-bit
  compensation is left entirely to ALRS (``training/alrs.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "double_round_codes",
    "double_round_fake",
    "floor_nest_fake",
    "grad_scale",
    "lsq_fake",
    "lsq_grad_scale",
    "qrange",
    "round_half_up",
    "shift_codes",
    "ste_round_half_up",
]

from lightning_dbq.options import MAX_BITS, MIN_BITS  # noqa: E402


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a ``bits``-bit code.

    .. math:: \\text{signed: } [-2^{b-1}, 2^{b-1}-1], \\quad \\text{unsigned: } [0, 2^b - 1]

    Example:
        >>> qrange(4, signed=True)
        (-8, 7)
        >>> qrange(2, signed=False)
        (0, 3)
    """
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def round_half_up(x: Tensor) -> Tensor:
    """``floor(x + 0.5)``: ties go up (towards +inf), matching ``(q + 2^(k-1)) >> k`` on integers."""
    return torch.floor(x + 0.5)


def ste_round_half_up(x: Tensor) -> Tensor:
    """Round-half-up in the forward pass, identity gradient (straight-through estimator)."""
    return x + (round_half_up(x) - x).detach()


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Return ``x`` unchanged in the forward pass with its gradient multiplied by ``g`` (LSQ's trick).

    Written as ``x.detach() + (y - y.detach())`` with ``y = g·x`` so that the forward value is *bit-identical* to
    ``x`` (LSQ's ``(x - g·x).detach() + g·x`` can differ in the last ulp, which would break the exact equality of
    the float path and the integer codes).
    """
    y = x * g
    return x.detach() + (y - y.detach())


def lsq_grad_scale(numel: int, q_p: int) -> float:
    """LSQ gradient scale ``1 / sqrt(numel * Q_P)`` for a scale shared by ``numel`` elements."""
    if numel <= 0 or q_p <= 0:
        raise ValueError(f"lsq_grad_scale: numel and q_p must be positive, got numel={numel}, q_p={q_p}")
    return 1.0 / math.sqrt(numel * q_p)


def _check_bits(high_bits: int, bits: int) -> int:
    if not (MIN_BITS <= bits <= high_bits <= MAX_BITS):
        raise ValueError(
            f"bits must satisfy {MIN_BITS} <= bits <= high_bits <= {MAX_BITS}, got bits={bits}, high_bits={high_bits}"
        )
    return high_bits - bits


def shift_codes(q_high: Tensor, high_bits: int, bits: int) -> Tensor:
    """Integer deployment path: ``clamp((q_h + 2^(k-1)) >> k)`` for ``k = high_bits - bits``.

    ``q_high`` is an integer tensor of signed ``high_bits``-bit codes. This is what a runtime does to switch
    a stored int8 model to ``bits`` bits; :func:`double_round_codes` must equal it exactly.
    """
    k = _check_bits(high_bits, bits)
    lo, hi = qrange(bits, signed=True)
    q = q_high.to(torch.int32)
    if k > 0:
        q = (q + (1 << (k - 1))) >> k
    return q.clamp(lo, hi)


def double_round_codes(w: Tensor, scale: Tensor, high_bits: int, bits: int) -> tuple[Tensor, Tensor]:
    """Integer codes of Double Rounding (no gradient).

    .. math::
        q_h = \\mathrm{clamp}(\\lfloor W/s_h + 1/2 \\rfloor, -2^{h-1}, 2^{h-1}-1), \\quad
        q_l = \\mathrm{clamp}(\\lfloor q_h / 2^k + 1/2 \\rfloor, -2^{l-1}, 2^{l-1}-1)

    Returns:
        ``(q_h, q_l)`` as int32 tensors shaped like ``w``.
    """
    k = _check_bits(high_bits, bits)
    with torch.no_grad():
        lo_h, hi_h = qrange(high_bits, signed=True)
        lo_l, hi_l = qrange(bits, signed=True)
        q_h = round_half_up(w.float() / scale.float()).clamp(lo_h, hi_h)
        q_l = round_half_up(q_h / float(1 << k)).clamp(lo_l, hi_l)
    return q_h.to(torch.int32), q_l.to(torch.int32)


def double_round_fake(w: Tensor, scale: Tensor, high_bits: int, bits: int, g: float = 1.0) -> Tensor:
    """Double Rounding fake-quant ``Ŵ_l = q_l · 2^k · s_h`` with straight-through gradients.

    Gradients (``v = W / s_h``; clip bounds in ``h``-bit units ``lo = -2^(l-1)·2^k``, ``hi = (2^(l-1)-1)·2^k``):

    * ``∂Ŵ/∂W = 1`` inside ``[lo, hi]``, ``0`` outside;
    * ``∂Ŵ/∂s_h = g · (2^k·q_l − v)`` inside, ``g·lo`` / ``g·hi`` when clipped.

    With ``bits == high_bits`` this is exactly LSQ (:func:`lsq_fake` with ``signed=True``).

    Args:
        w: weights (any shape).
        scale: positive scale broadcastable to ``w`` (per-tensor scalar or per-channel ``(C, 1, ...)``).
        high_bits: stored precision ``h``.
        bits: active precision ``l <= h``.
        g: LSQ gradient scale applied to ``scale``.
    """
    k = _check_bits(high_bits, bits)
    step = float(1 << k)
    lo_l, hi_l = qrange(bits, signed=True)
    s = grad_scale(scale.float(), g)
    # Clip in h-bit units before rounding (LSQ's order). The l-bit range in h units, [lo_l·2^k, hi_l·2^k], lies
    # inside the h-bit range, so this forward equals clamp_l(rhu(clamp_h(rhu(v)) / 2^k)) exactly, and the STE
    # gradient masks are exactly the strict-inside / clipped branches of the formula above.
    v = torch.clamp(w.float() / s, lo_l * step, hi_l * step)
    q_l = ste_round_half_up(ste_round_half_up(v) / step)
    return (q_l * (step * s)).to(w.dtype)


def ste_floor(x: Tensor) -> Tensor:
    """``floor`` in the forward pass, identity gradient."""
    return x + (torch.floor(x) - x).detach()


def floor_nest_fake(w: Tensor, scale: Tensor, high_bits: int, bits: int, g: float = 1.0) -> Tensor:
    """Floor nesting baseline (AdaBits-style): ``q_l = q_h >> k`` (floor), ``Ŵ_l = q_l · 2^k · s_h``.

    Same storage as Double Rounding (one ``h``-bit code per weight); the lower bits truncate instead of rounding,
    so ``Ŵ_l`` is biased towards −∞ by up to one ``l``-bit step. STE through both roundings; clip at the ``h``-bit
    range (the shifted code never leaves the ``l``-bit range).
    """
    k = _check_bits(high_bits, bits)
    step = float(1 << k)
    lo_h, hi_h = qrange(high_bits, signed=True)
    s = grad_scale(scale.float(), g)
    v = torch.clamp(w.float() / s, lo_h, hi_h)
    q_l = ste_floor(ste_round_half_up(v) / step)
    return (q_l * (step * s)).to(w.dtype)


def lsq_fake(x: Tensor, scale: Tensor, bits: int, signed: bool, g: float = 1.0) -> Tensor:
    """Plain LSQ fake-quant ``x̂ = s · clamp(rhu(x / s), Q_N, Q_P)`` with STE and gradient scale ``g`` on ``s``."""
    if not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    lo, hi = qrange(bits, signed)
    s = grad_scale(scale.float(), g)
    q = ste_round_half_up(torch.clamp(x.float() / s, lo, hi))
    return (q * s).to(x.dtype)
