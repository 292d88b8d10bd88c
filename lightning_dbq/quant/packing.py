"""Pack signed integer codes of 2..4 bits into bytes (nibbles for 3–4 bits, crumbs for 2 bits)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_codes", "pack_width", "unpack_codes"]


def pack_width(bits: int) -> int:
    """Storage width per code: 2 (crumb) for 2-bit, 4 (nibble) for 3–4-bit, 8 (one int8) otherwise."""
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    return 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack a flat view of signed ``bits``-bit ``codes`` into a uint8 tensor (int8 copy when ``bits > 4``)."""
    width = pack_width(bits)
    flat = codes.reshape(-1).to(torch.int16)
    if width == 8:
        return flat.to(torch.int8)
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
    signed = u - ((u >> (width - 1)) & 1) * (1 << width)
    return signed.to(torch.int8)
