"""Frozen activation quantizers: the fixed-scale modules :func:`~lightning_dbq.freeze` puts in front of a layer.

Each is what an activation quantizer's :meth:`~lightning_dbq.quant.quantizers.ActQuantizer.frozen` returns, and
computes its training forward bit for bit (same float32 operations in the same order). Scales are 0-dim float32
buffers, not Python floats: they move with ``.to(device)`` and stay tensors on the model's device, like the
training scales, so every division is the same true division (PyTorch's CUDA kernel divides by a *CPU scalar* as a
multiplication by its reciprocal, which can differ in the last bit and flip a rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_dbq.quant.functional import qrange

__all__ = ["FrozenActQuant", "FrozenSignAct"]


def _scale_buffer(scale: Tensor | float) -> Tensor:
    return torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())


class FrozenActQuant(nn.Module):
    """A fixed activation quantizer: ``y = clamp(floor(x/s + 1/2), lo, hi) · s`` in float32, cast back to x's dtype.

    Bit-identical to the training quantizer's forward at the same scale (the fused kernel clamps to the float32
    neighbours just inside ``[lo, hi]``, which round to the same integers). With ``bits=1, signed=False`` it is the
    unsigned binary activation ``{0, s}``.

    Args:
        scale: the positive step ``s`` (stored as a 0-dim float32 buffer ``scale``).
        bits: code width ``b``.
        signed: codes in ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]``.
    """

    scale: Tensor

    def __init__(self, scale: Tensor | float, bits: int, signed: bool) -> None:
        super().__init__()
        self.bits = int(bits)
        self.signed = bool(signed)
        lo, hi = qrange(self.bits, self.signed)
        self.lo, self.hi = float(lo), float(hi)
        self.register_buffer("scale", _scale_buffer(scale))

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the frozen scale and range."""
        s = self.scale.float()
        q = x.float() / s  # a new tensor: the rest runs in place on it (same operations, same order, no temporaries)
        if q.requires_grad:
            return (torch.floor(torch.clamp(q, self.lo, self.hi) + 0.5) * s).to(x.dtype)
        return q.clamp_(self.lo, self.hi).add_(0.5).floor_().mul_(s).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, scale={float(self.scale):.6g}"


class FrozenSignAct(nn.Module):
    """A fixed signed binary activation: ``y = s · sign(x / s)`` in ``{-s, +s}`` (``sign(0) = +1``), float32.

    Bit-identical to :func:`~lightning_dbq.quant.functional.binary_act_fake` with ``signed=True`` at the same scale.

    Args:
        scale: the positive scale ``s`` (a 0-dim float32 buffer ``scale``).
    """

    scale: Tensor
    bits = 1
    signed = True

    def __init__(self, scale: Tensor | float) -> None:
        super().__init__()
        self.register_buffer("scale", _scale_buffer(scale))

    def forward(self, x: Tensor) -> Tensor:
        """Binarise ``x`` with the frozen scale."""
        s = self.scale.float()
        q = torch.where(x.float() / s >= 0, 1.0, -1.0)
        return (q * s).to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.6g}"
