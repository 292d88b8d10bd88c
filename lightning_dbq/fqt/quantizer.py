"""The stochastic-rounding affine group quantizer (StatQuant's ``UniformQuantize`` + per-row preconditioner).

For one group (a row ``r`` of a 2-D tensor) with ``B = 2**bits - 1`` bins::

    z = min(r) - 1e-8;  R = max(r) - min(r) + 2e-8;  S = B / R
    q = clamp(floor((r - z)·S + U[0, 1)), 0, B);  r̂ = q / S + z

``E[r̂] = r`` (floor of ``t + U`` is ``t`` on average; the clamp never bites because ``0 <= t <= B``), the
per-element variance is at most ``(R/B)²/4``, and with ``bits=1`` every element becomes its group's min or max.
The ``±1e-8`` padding keeps ``R > 0``; an all-zero group is returned as exact zeros (``q = 0, z = 0``).
Half-precision input is quantized in float32 (the padding underflows in fp16).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PAD", "dequantize", "group_codes", "quantize_rows", "quantize_tensor"]

PAD = 1e-8


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def group_codes(rows: Tensor, bits: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Stochastic-rounding codes of every row of ``rows`` (one group per row).

    Args:
        rows: a 2-D tensor ``(G, D)``: ``G`` groups of ``D`` elements.
        bits: ``1``–``16``.
        generator: the source of the rounding noise ``U[0, 1)`` (on ``rows.device``).

    Returns:
        ``(q, S, z)``: integer-valued codes ``q`` in ``[0, 2**bits - 1]`` (same shape and float dtype as the
        computation), per-row scales ``S`` and zero points ``z`` of shape ``(G, 1)``; ``q / S + z`` dequantizes.
    """
    if rows.dim() != 2:
        raise ValueError(f"group_codes: rows must be 2-D (groups, elements), got shape {tuple(rows.shape)}")
    r = rows.to(_work_dtype(rows))
    levels = float(2**bits - 1)
    lo = r.amin(dim=1, keepdim=True)
    hi = r.amax(dim=1, keepdim=True)
    zero = (lo == 0) & (hi == 0)
    z = (lo - PAD).masked_fill(zero, 0.0)
    scale = levels / (hi - lo + 2 * PAD)
    noise = torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype)
    q = torch.floor((r - z) * scale + noise).clamp_(0.0, levels).masked_fill_(zero, 0.0)
    return q, scale, z


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``q / S + z`` (row-wise broadcast)."""
    return q / scale + zero_point


def quantize_rows(rows: Tensor, bits: int, generator: torch.Generator | None) -> Tensor:
    """Unbiased stochastic-rounding estimate of ``rows`` (``(G, D)``, one group per row), in ``rows.dtype``."""
    if rows.numel() == 0:
        return rows.clone()
    return dequantize(*group_codes(rows, bits, generator)).to(rows.dtype)


def quantize_tensor(x: Tensor, bits: int, generator: torch.Generator | None) -> Tensor:
    """Per-tensor (one group) estimate of ``x``, any shape."""
    return quantize_rows(x.reshape(1, -1), bits, generator).reshape(x.shape)
