"""Pack integer codes into bytes: signs for 1 bit (8 per byte), crumbs for 2 bits, nibbles for 3–4 bits.

Codes of ``b >= 2`` bits are signed two's complement (``[-2^(b-1), 2^(b-1) - 1]``). 1-bit codes are *signs*
``±1`` (binary weights), stored as bit 1 for ``+1`` and bit 0 for ``-1``. Codes are packed from the least
significant bits of each byte (code ``i`` of a byte at bits ``i·width``), zero-padded at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["code_range", "pack_codes", "pack_width", "unpack_codes"]


def pack_width(bits: int) -> int:
    """Storage width per code: 1 for 1-bit (sign) codes, 2 (crumb) for 2-bit, 4 (nibble) for 3–4-bit, 8 (one
    int8) otherwise."""
    if bits <= 1:
        return 1
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    return 8


def code_range(bits: int) -> tuple[int, int]:
    """The range of stored ``bits``-bit codes: ``(-1, 1)`` (signs, never 0) for 1 bit, else two's complement."""
    if bits <= 1:
        return -1, 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack a flat view of signed ``bits``-bit ``codes`` into a uint8 tensor (int8 copy when ``bits > 4``).

    Raises:
        ValueError: 1-bit codes other than ``±1``.
    """
    width = pack_width(bits)
    flat = codes.reshape(-1).to(torch.int16)
    if width == 8:
        return flat.to(torch.int8)
    if width == 1:
        if flat.numel() and not bool((flat.abs() == 1).all()):
            raise ValueError("pack_codes(): 1-bit codes must be signs, -1 or +1")
        flat = (flat > 0).to(torch.int16)
    per_byte = 8 // width
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    u = (flat & ((1 << width) - 1)).to(torch.uint8).reshape(-1, per_byte)
    out = torch.zeros(u.shape[0], dtype=torch.uint8)
    for i in range(per_byte):
        out |= u[:, i] << (i * width)
    return out


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` signed codes as int8."""
    width = pack_width(bits)
    if width == 8:
        return packed.reshape(-1)[:numel].to(torch.int8)
    per_byte = 8 // width
    mask = (1 << width) - 1
    parts = [((packed >> (i * width)) & mask).to(torch.int16) for i in range(per_byte)]
    u = torch.stack(parts, dim=1).reshape(-1)[:numel]
    if width == 1:
        return (2 * u - 1).to(torch.int8)
    signed = u - ((u >> (width - 1)) & 1) * (1 << width)
    return signed.to(torch.int8)
