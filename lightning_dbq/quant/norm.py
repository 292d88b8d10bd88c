"""Per-bit normalisation containers.

:class:`PerBitNorm` holds one deep copy of the original norm per candidate bit (so timm's ``BatchNormAct2d`` keeps
its activation and drop, and pretrained statistics are kept). It is a container, not a ``_BatchNorm`` subclass,
so ``SyncBatchNorm`` conversion converts the copies inside it instead of replacing it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PerBitNorm", "TransitionalNorm"]


class PerBitNorm(nn.Module):
    """One copy of ``norm`` per candidate bit; the copy of :attr:`active_bits` runs.

    Args:
        norm: the original norm module (copied, not shared).
        bits: candidate bits.
        owner: name of the quantized layer whose output this norm normalises; in per-layer (mixed) configs the
            norm follows that layer's bits.
    """

    def __init__(self, norm: nn.Module, bits: Sequence[int], owner: str = "") -> None:
        super().__init__()
        self.bits: tuple[int, ...] = tuple(sorted(bits, reverse=True))
        self.active_bits: int = self.bits[0]
        self.owner = owner
        self.norms = nn.ModuleDict({str(b): copy.deepcopy(norm) for b in self.bits})

    def forward(self, x: Tensor) -> Tensor:
        """Apply the norm of the active bit."""
        return self.norms[str(self.active_bits)](x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, active_bits={self.active_bits}, owner={self.owner!r}"


class TransitionalNorm(nn.Module):
    """One norm copy per ``(previous layer bits, this layer bits)`` pair (Bit-Mixer's transitional BN).

    In a mixed-precision SuperNet the statistics after a layer depend on its own bits *and* on the bits of the
    quantized layer before it; uniform configurations use the diagonal copies ``(b, b)``, which equal the
    :class:`PerBitNorm` copies they are initialised from.

    Args:
        norm: the original norm module (copied).
        bits: candidate bits.
        owner: the quantized layer whose output this norm normalises.
        prev: the quantized layer before ``owner`` (``""`` for the first one: then only the ``(b, b)`` pairs are used).
    """

    def __init__(self, norm: nn.Module, bits: Sequence[int], owner: str = "", prev: str = "") -> None:
        super().__init__()
        self.bits: tuple[int, ...] = tuple(sorted(bits, reverse=True))
        self.owner = owner
        self.prev = prev
        self.active: tuple[int, int] = (self.bits[0], self.bits[0])
        self.norms = nn.ModuleDict({self.key(p, b): copy.deepcopy(norm) for p in self.bits for b in self.bits})

    @staticmethod
    def key(prev_bits: int, bits: int) -> str:
        """ModuleDict key of a pair, e.g. ``"8_4"``."""
        return f"{prev_bits}_{bits}"

    @property
    def active_bits(self) -> int:
        """Bits of the owner layer."""
        return self.active[1]

    def forward(self, x: Tensor) -> Tensor:
        """Apply the norm of the active ``(prev bits, bits)`` pair."""
        return self.norms[self.key(*self.active)](x)

    @torch.no_grad()
    def copy_diagonal_to_all(self) -> None:
        """Initialise every ``(p, b)`` copy from the uniform ``(b, b)`` copy (start of mixed-precision training)."""
        for b in self.bits:
            src = self.norms[self.key(b, b)].state_dict()
            for p in self.bits:
                if p != b:
                    self.norms[self.key(p, b)].load_state_dict(src)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, active={self.active}, owner={self.owner!r}, prev={self.prev!r}"
