"""Pure quantization math: round-half-up with STE, Double Rounding and LSQ fake-quant, code expansion, and the
binary (1-bit) weight and activation fake-quant.

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
    "binary_act_fake",
    "binary_alpha",
    "binary_center",
    "binary_weight_fake",
    "decode_weight",
    "double_round_codes",
    "double_round_fake",
    "double_round_grads",
    "expand_codes",
    "floor_nest_fake",
    "grad_scale",
    "lsq_fake",
    "lsq_grad_scale",
    "lsq_grads",
    "qrange",
    "rhu_interval",
    "round_half_up",
    "shift_codes",
    "sign_codes",
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
    # an int (exact as a float operand): under torch.compile(dynamic=True) a float(2^k) of symbolic bit-widths is
    # generated as std::pow calls inside the element loop (2.4x slower); an int is computed once, outside the loop
    step = 1 << k
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


def _window_grads(grad: Tensor, x: Tensor, s: Tensor, lo: int, hi: int, step: int, g: float) -> tuple[Tensor, Tensor]:
    """The straight-through gradients of ``y = s · step · rhu(rhu(clamp(x / s, lo, hi)) / step)`` (grad scale ``g``)
    given ``grad = dL/dy``: ``(grad · inside, g · Σ grad · (q − v·inside))`` with ``v = x / s``,
    ``inside = lo < v < hi`` and ``q`` the code in units of ``s``; the sum to ``s``'s shape. Integer bounds and step:
    under ``torch.compile(dynamic=True)`` they stay symbolic (no recompile per bit-width)."""
    v = x.float() / s
    inside = (v > lo) & (v < hi)
    q = torch.floor(torch.floor(torch.clamp(v, lo, hi) + 0.5) / step + 0.5) * step  # exact for step = 1 too
    u = grad * (q - torch.where(inside, v, 0.0))
    return grad * inside, u.sum_to_size(s.shape) * g


def lsq_grads(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool, g: float = 1.0) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`lsq_fake` ``(x, scale, bits, signed, g)`` w.r.t. ``(x, scale)`` given ``grad = dL/dy``,
    in closed form and without a graph (float32 ``grad``, ``x`` and ``scale``).

    ``dL/dx = grad`` where ``Q_N < x/s < Q_P`` and ``0`` elsewhere; ``dL/ds = g · Σ grad · (q − x/s)`` inside,
    ``g · Σ grad · Q_N`` / ``Q_P`` where clipped (``q = rhu(x/s)``), summed to ``scale``'s shape. The input
    gradient is the fused kernel's bit for bit; the scale gradient agrees with autograd of :func:`lsq_fake` up to
    float32 rounding. Written for ``torch.compile`` (the ``compile`` back-end fuses it into one element loop and one
    reduction, :mod:`lightning_dbq.quant.kernels`).
    """
    lo, hi = qrange(bits, signed)
    return _window_grads(grad, x, scale.float(), lo, hi, 1, g)


def double_round_grads(grad: Tensor, w: Tensor, scale: Tensor, high_bits: int, bits: int,
                       g: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gradients of :func:`double_round_fake` ``(w, scale, high_bits, bits, g)`` w.r.t. ``(w, scale)`` given
    ``grad = dL/dŴ``, in closed form and without a graph (see :func:`lsq_grads`; the window and the code are those
    of the ``bits``-bit grid in ``high_bits``-bit units)."""
    step = 1 << _check_bits(high_bits, bits)
    lo, hi = qrange(bits, signed=True)
    return _window_grads(grad, w, scale.float(), lo * step, hi * step, step, g)


def expand_codes(codes: Tensor, code_bits: int, high_bits: int) -> Tensor:
    """Width-``w`` codes on the ``h``-bit grid: ``c · 2^(h-w)`` (int32), what a full artifact would have stored."""
    return codes.to(torch.int32) * (1 << (high_bits - code_bits))


def decode_weight(codes: Tensor, code_bits: int, high_bits: int, scale: Tensor) -> Tensor:
    """The float32 weight ``c · 2^(h-w) · s`` that ``load_int`` puts into a layer (``scale``: the stored scale)."""
    return expand_codes(codes, code_bits, high_bits).float() * scale.float()


def rhu_interval(target: Tensor, shift: int, bits: int, width: int) -> tuple[Tensor, Tensor]:
    """Per element, the inclusive range of ``width``-bit codes ``c`` with ``clamp(rhu(c / 2^shift)) == target``
    (``target``: signed ``bits``-bit codes; a target at the edge of its range takes every code beyond it)."""
    lo_w, hi_w = qrange(width, signed=True)
    lo_l, hi_l = qrange(bits, signed=True)
    t = target.to(torch.int64)
    if shift == 0:
        lower, upper = t, t.clone()
    else:
        half = 1 << (shift - 1)
        lower, upper = t * (1 << shift) - half, t * (1 << shift) + half - 1
    lower = torch.where(t == lo_l, torch.full_like(t, lo_w), lower)
    upper = torch.where(t == hi_l, torch.full_like(t, hi_w), upper)
    return lower, upper


# ------------------------------------------------------------------------------------------------ binary (1-bit)

BINARY_ALPHA_MIN = 1e-8  # floor of the binary weight scale (a channel whose weights are all equal has alpha 0)


def binary_center(w: Tensor) -> Tensor:
    """Per output channel (dim 0) centre ``mu`` of a weight: the channel mean clamped to the channel's
    ``[min, max]``, float32, shaped ``(C, 1, ...)``, without gradient.

    The real mean always lies in ``[min, max]``; the clamp makes the float mean of equal values equal them, so
    :func:`sign_codes` of a decoded ``±alpha`` weight gives back the codes it was decoded from.
    """
    with torch.no_grad():
        flat = w.float().reshape(w.shape[0], -1)
        center = torch.clamp(flat.mean(dim=1), flat.amin(dim=1), flat.amax(dim=1))
    return center.reshape((w.shape[0],) + (1,) * (w.dim() - 1))


def binary_alpha(w: Tensor, center: Tensor) -> Tensor:
    """Per output channel scale ``alpha = mean|W - mu|`` (XNOR-Net's ``||W - mu||_1 / n``), float32, shaped
    ``(C, 1, ...)``, floored at :data:`BINARY_ALPHA_MIN`; keeps ``w``'s autograd graph."""
    flat = (w.float() - center.float()).reshape(w.shape[0], -1)
    alpha = flat.abs().mean(dim=1).clamp_min(BINARY_ALPHA_MIN)
    return alpha.reshape((w.shape[0],) + (1,) * (w.dim() - 1))


def sign_codes(w: Tensor, center: Tensor) -> Tensor:
    """Binary codes ``+1`` where ``W - mu >= 0``, ``-1`` elsewhere (int32; ``sign(0)`` is ``+1``)."""
    with torch.no_grad():
        return torch.where(w.float() - center.float() >= 0, 1, -1).to(torch.int32)


def binary_weight_fake(w: Tensor, alpha: Tensor, center: Tensor, clip: float = 1.0) -> Tensor:
    """Binary weight ``Ŵ = alpha · sign(W - mu)`` (``sign(0) = +1``) with a clipped straight-through gradient.

    The straight-through window is on the *normalised* weight ``u = (W - mu) / alpha`` (hardtanh of ``u``):
    ``∂Ŵ/∂W = 1`` where ``|u| <= clip``, ``0`` outside (for ``alpha`` given without gradient). A window on the raw
    ``|W - mu| <= 1`` would never clip weights of typical magnitude (~1e-2), so it is taken in units of ``alpha``,
    which makes it independent of the weight's scale. When ``alpha`` carries a gradient (training), it receives
    ``sign(u) - u`` inside the window and ``sign(u)`` outside (the 1-bit analogue of LSQ's scale gradient).

    Args:
        w: weights, any shape with the output channel first.
        alpha: positive scale broadcastable to ``w`` (per channel ``(C, 1, ...)``).
        center: the centre ``mu`` broadcastable to ``w`` (no gradient).
        clip: half-width of the straight-through window in units of ``alpha``.
    """
    a = alpha.float()
    d = w.float() - center.float()
    u = torch.clamp(d / a, -clip, clip)
    sign = torch.where(d >= 0, 1.0, -1.0)
    q = sign + (u - u.detach())  # forward: exactly ±1; backward: the hardtanh window of u
    return (q * a).to(w.dtype)


def binary_act_fake(x: Tensor, scale: Tensor, signed: bool, g: float = 1.0) -> Tensor:
    """1-bit activation fake-quant with a learned scale ``s`` and gradient scale ``g`` on ``s``.

    * unsigned (inputs after a ReLU): ``s · rhu(clamp(x / s, 0, 1))`` in ``{0, s}`` — exactly LSQ at one bit;
    * signed: ``s · sign(x / s)`` in ``{-s, +s}`` (``sign(0) = +1``; ReActNet-style).

    Straight-through gradients, with ``v = x / s``: ``∂/∂x = 1`` inside the clipping window (``0 <= v <= 1``
    unsigned, ``|v| <= 1`` signed), ``0`` outside; ``∂/∂s = g · (q - v)`` inside and ``g · q`` outside (``q``: the
    code).
    """
    s = grad_scale(scale.float(), g)
    v = x.float() / s
    lo = -1.0 if signed else 0.0
    c = torch.clamp(v, lo, 1.0)
    code = torch.where(v >= 0, 1.0, -1.0) if signed else round_half_up(c)
    q = code.detach() + (c - c.detach())  # forward: exactly the code; backward: the clipping window of v
    return (q * s).to(x.dtype)
