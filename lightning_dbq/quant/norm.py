"""Per-bit normalisation containers.

:class:`PerBitNorm` holds one deep copy of the original norm per candidate bit (so timm's ``BatchNormAct2d`` keeps
its activation and drop, and pretrained statistics are kept). It is a container, not a ``_BatchNorm`` subclass,
so ``SyncBatchNorm`` conversion converts the copies inside it instead of replacing it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["PerBitNorm"]


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
