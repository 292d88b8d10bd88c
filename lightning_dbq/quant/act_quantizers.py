"""LSQ activation quantizers: one learned scale per candidate bit (:class:`ActQuantizer`).

Activations are not stored, so nothing forces them to share a scale; a quantizer is unsigned after non-negative
inputs, signed otherwise, and initialised from the first batch it sees (averaged over ranks under
``torch.distributed``). Scales are positive by construction: the module stores a raw parameter ``p`` and uses
``|p| + eps``. Each weight mode names the activation quantizer that goes with it
(:attr:`~lightning_dbq.quant.quantizers.WeightQuantizer.act_quantizer`; binary activations:
:class:`~lightning_dbq.quant.binary.BinaryActQuantizer`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_dbq.quant.frozen import FrozenActQuant
from lightning_dbq.quant.functional import MAX_BITS, MIN_BITS, lsq_grad_scale, qrange
from lightning_dbq.quant.kernels import check_kernel, kernels
from lightning_dbq.quant.recompute import FakeQuantOp

__all__ = ["SCALE_EPS", "ActQuantizer"]

SCALE_EPS = 1e-8


def _positive(p: Tensor) -> Tensor:
    return p.abs() + SCALE_EPS


class ActQuantizer(nn.Module):
    """LSQ activation quantizer with one learned scale per candidate bit.

    Initialised lazily from the first batch: the sign (unsigned iff the batch is non-negative) and
    ``s_b = 2·mean|x| / sqrt(Q_P(b))`` for every ``b``. The LSQ gradient scale is ``1/sqrt(N·Q_P(b))`` with ``N`` the
    number of elements *per sample* (``x[0].numel()``).

    Subclasses (e.g. :class:`~lightning_dbq.quant.binary.BinaryActQuantizer`) change the quantizer itself through
    :meth:`_init_scale`, :meth:`_op` and :meth:`frozen`; the state (``scales``, ``initialized``, ``signed``)
    and its initialisation are shared.

    Args:
        bits: candidate bits, any order.
        kernel: fake-quant back-end, ``"fused"`` | ``"eager"`` | ``"compile"`` | ``"auto"``
            (:mod:`lightning_dbq.quant.kernels`).
    """

    initialized: Tensor
    signed: Tensor
    #: redo an initialisation made on an eval-mode batch at the first training-mode batch. An eval-mode batch (e.g.
    #: Lightning's sanity-check validation before the first step) runs the BatchNorms on their initial running
    #: statistics, so its activations can be far from the training ones; scales fitted to them can leave a 1-bit
    #: quantizer all zeros. Off for LSQ (its behaviour before this switch), on for binary activations.
    reinit_after_eval_init: ClassVar[bool] = False
    _eval_init: bool = False

    def __init__(self, bits: Sequence[int], kernel: str = "fused") -> None:
        super().__init__()
        self.kernel: str = check_kernel(kernel)
        self.bits: tuple[int, ...] = tuple(sorted(bits, reverse=True))
        self._check_bits(self.bits)
        self.active_bits: int = self.bits[0]
        self.enabled: bool = True
        # One Parameter per bit so that optimizers (momentum, Adam state) never move another bit's scale.
        self.scales = nn.ParameterDict({str(b): nn.Parameter(torch.ones(())) for b in self.bits})
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(False))
        # Python mirrors of the two buffers: reading a tensor as bool on every forward costs a sync on GPU and a
        # graph break under torch.compile. Re-read from the buffers after any state_dict load.
        self._cached: tuple[bool, bool] | None = None

    @classmethod
    def _check_bits(cls, bits: tuple[int, ...]) -> None:
        """LSQ activations need at least 2 bits (a signed 1-bit LSQ code would be ``{-1, 0}``)."""
        bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"{cls.__name__}: bits must be in [{MIN_BITS}, {MAX_BITS}], got {list(bits)}; 1-bit "
                             "activations come with weight_mode='binary'")  # fmt: skip

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cached = None
        self._eval_init = False  # loaded scales are kept
        super()._load_from_state_dict(*args, **kwargs)

    def _init_scale(self, mean_abs: float, bits: int, signed: bool) -> float:
        """LSQ's initial scale ``2·mean|x| / sqrt(Q_P(bits))`` (at least 1e-6)."""
        return max(2.0 * mean_abs / math.sqrt(qrange(bits, signed)[1]), 1e-6)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the sign and every per-bit scale from a batch (averaged across ranks when distributed)."""
        stats = torch.stack([x.detach().float().abs().mean(), -x.detach().float().min()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mean_abs = stats[:1].clone()
            dist.all_reduce(mean_abs, op=dist.ReduceOp.SUM)
            neg = stats[1:].clone()
            dist.all_reduce(neg, op=dist.ReduceOp.MAX)
            stats = torch.cat([mean_abs / dist.get_world_size(), neg])
        mean_abs_f, neg_min = float(stats[0]), float(stats[1])
        signed = neg_min > 0.0
        self.signed.fill_(signed)
        for b in self.bits:
            self.scales[str(b)].data.fill_(self._init_scale(mean_abs_f, b, signed))
        self.initialized.fill_(True)
        self._cached = (True, signed)
        self._eval_init = self.reinit_after_eval_init and not self.training

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` at :attr:`active_bits` (identity when disabled)."""
        if not self.enabled:
            return x
        op, scale = self.fake_quant_op(x)
        return op(x, scale)

    def fake_quant_op(self, x: Tensor) -> tuple[FakeQuantOp, Tensor]:
        """What an enabled :meth:`forward` does to ``x``: ``forward(x) == op(x, scale)``.

        Initialises the scales from ``x`` first when the forward would (the first batch); the op's arguments (bits,
        sign, gradient scale, kernel) are fixed at this call. Used by :mod:`lightning_dbq.quant.recompute`.
        """
        if self._eval_init and self.training:
            self.initialize(x)
        if self._cached is None:
            if not bool(self.initialized):
                self.initialize(x)
            self._cached = (True, bool(self.signed))
        bits = self.active_bits
        return self._op(x, bits, self._cached[1]), _positive(self.scales[str(bits)])

    def _op(self, x: Tensor, bits: int, signed: bool) -> FakeQuantOp:
        """LSQ fake-quant at ``bits`` (the kernel back-end's ``lsq``), its gradient scale from ``x``'s size."""
        g = lsq_grad_scale(max(x[0].numel(), 1), qrange(bits, signed)[1])
        return kernels(self.kernel, x.device.type).lsq_op(bits, signed, g)

    def frozen(self) -> nn.Module:
        """The fixed module computing this quantizer's forward at its active bits (:func:`~lightning_dbq.freeze`)."""
        b = self.active_bits
        scale = _positive(self.scales[str(b)].detach()).float()
        return FrozenActQuant(scale, b, bool(self.signed))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, active_bits={self.active_bits}, kernel={self.kernel!r}"
