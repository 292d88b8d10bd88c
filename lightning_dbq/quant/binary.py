"""Binary (1-bit) weights and activations: ``prepare(model, bits=[1], weight_mode="binary")``.

* Weights (XNOR-Net style): ``Ŵ = alpha · sign(W − mu)`` per output channel, with the channel's centre ``mu``
  (its mean, :func:`~lightning_dbq.quant.functional.binary_center`) and scale ``alpha = mean|W − mu|``
  (:func:`~lightning_dbq.quant.functional.binary_alpha`), and a straight-through gradient clipped to the
  hardtanh window ``|W − mu| <= alpha`` (the window is on the normalised weight ``(W − mu) / alpha``: on the raw
  ``|W − mu| <= 1`` it would never clip weights of typical size ~1e-2).
  ``alpha`` is recomputed from ``W`` on every training-mode forward (with its gradient, as in XNOR-Net) and kept in
  the buffer ``alpha``; eval-mode forwards use the buffer (like BatchNorm's statistics), so a served model is a
  function of its ±1 codes and ``alpha`` only. One ``alpha`` per output channel whatever ``per_channel`` says.
* Activations (:class:`BinaryActQuantizer`): unsigned inputs (after a ReLU) become ``{0, s}`` — LSQ at one bit —
  and signed inputs ``s · sign(x)`` (ReActNet-style), each with a learned scale ``s`` and a straight-through
  gradient clipped to the quantizer's range.

Artifacts store the codes 1 bit per weight (8 per byte, bit 1 = +1, :mod:`lightning_dbq.quant.packing`) plus
``alpha``; ``load_int`` puts ``c · alpha`` into each layer, whose codes and ``alpha`` are then exactly the saved ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_dbq.quant.act_quantizers import ActQuantizer, _positive
from lightning_dbq.quant.frozen import FrozenActQuant, FrozenSignAct
from lightning_dbq.quant.functional import (
    binary_act_fake,
    binary_alpha,
    binary_center,
    binary_weight_fake,
    lsq_grad_scale,
    sign_codes,
)
from lightning_dbq.quant.quantizers import WeightQuantizer
from lightning_dbq.quant.recompute import FakeQuantOp
from lightning_dbq.quant.registry import register_weight_quantizer

__all__ = ["BINARY_CLIP", "BinaryActQuantizer", "BinaryWeightQuantizer"]

#: half-width of the weights' straight-through window, in units of ``alpha`` (``|W − mu| <= BINARY_CLIP·alpha``)
BINARY_CLIP = 1.0


def _check_binary_bits(name: str, bits: tuple[int, ...]) -> None:
    if tuple(bits) != (1,):
        raise ValueError(f"{name} needs bits=[1] (one precision: binary weights and activations), got {list(bits)}")


class BinaryActQuantizer(ActQuantizer):
    """1-bit activations: ``{0, s}`` for unsigned inputs, ``s · sign(x)`` for signed ones (learned ``s``).

    Initial scale from the first batch: ``2·mean|x|`` unsigned (LSQ's rule at one bit), ``mean|x|`` signed (the
    least-squares scale of ``s · sign(x)``). A first batch seen in eval mode (e.g. Lightning's sanity-check
    validation, with the BatchNorms still on their initial running statistics) initialises provisionally: the first
    training-mode batch initialises again
    (:attr:`~lightning_dbq.quant.act_quantizers.ActQuantizer.reinit_after_eval_init`). Runs eagerly whatever the
    ``kernel``.

    Args:
        bits: must be ``[1]``.
        kernel: recorded for :func:`~lightning_dbq.set_kernel`; the binariser always runs the eager functions.
    """

    reinit_after_eval_init = True

    @classmethod
    def _check_bits(cls, bits: tuple[int, ...]) -> None:
        _check_binary_bits(cls.__name__, bits)

    def _init_scale(self, mean_abs: float, bits: int, signed: bool) -> float:
        return max((1.0 if signed else 2.0) * mean_abs, 1e-6)

    def _op(self, x: Tensor, bits: int, signed: bool) -> FakeQuantOp:
        return FakeQuantOp(binary_act_fake, (signed, lsq_grad_scale(max(x[0].numel(), 1), 1)))

    def frozen(self) -> nn.Module:
        """:class:`~lightning_dbq.quant.frozen.FrozenSignAct` (signed) or a 1-bit unsigned ``FrozenActQuant``."""
        scale = _positive(self.scales[str(self.active_bits)].detach()).float()
        return FrozenSignAct(scale) if bool(self.signed) else FrozenActQuant(scale, 1, False)


@register_weight_quantizer("binary")
class BinaryWeightQuantizer(WeightQuantizer):
    """Binary weights ``alpha · sign(W − mu)`` with one ``alpha`` per output channel (module docstring).

    State: the buffer ``alpha`` (``(C, 1, ...)``, float32), no learned parameter.
    """

    min_code_bits = 1
    #: latent weights (std ~0.1) only flip where they cross the channel mean; Adam moves each by about lr per step,
    #: so at lr 5e-4 a 12-epoch digits run flips almost nothing: latent weights train at max(lr, this) by default
    min_useful_lr = 1e-2
    act_quantizer = BinaryActQuantizer
    alpha: Tensor

    @classmethod
    def check_bits(cls, bits: tuple[int, ...]) -> None:
        _check_binary_bits("weight_mode='binary'", bits)

    def _init_state(self, w: Tensor) -> None:
        self.register_buffer("alpha", binary_alpha(w, binary_center(w)).detach().clone())

    def effective_scale(self) -> Tensor:
        """The stored per-channel ``alpha`` (the one eval-mode forwards, freeze and artifacts use)."""
        return self.alpha

    def scale_tensors(self) -> tuple[Tensor, ...]:
        return (self.alpha,)

    def _fake_quant(self, w: Tensor) -> Tensor:
        center = binary_center(w)
        if self.training:
            alpha = binary_alpha(w, center)
            with torch.no_grad():
                self.alpha.copy_(alpha.detach())
        else:
            alpha = self.alpha
        return binary_weight_fake(w, alpha, center, BINARY_CLIP)

    def codes(self, w: Tensor) -> Tensor:
        """``+1`` where ``W − mu >= 0``, ``-1`` elsewhere, as int8."""
        return sign_codes(w, binary_center(w)).to(torch.int8)

    @classmethod
    def nest_codes(cls, q_high: Tensor, high_bits: int, bits: int) -> Tensor:
        """The codes themselves (one precision)."""
        return q_high.to(torch.int32)

    @classmethod
    def fake_weight(cls, weight: Tensor, scale: Tensor, high_bits: int, bits: int) -> Tensor:
        with torch.no_grad():
            return binary_weight_fake(weight, scale, binary_center(weight), BINARY_CLIP)
