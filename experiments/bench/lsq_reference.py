"""A plain, straightforward LSQ fake-quant (Esser et al., 2020), written here as P1's reference implementation.

Nothing from ``lightning_dbq`` is used: one learned weight scale and one learned activation scale per layer, the
paper's ``grad_scale`` / ``round_pass`` helpers (``torch.round``), a single BatchNorm. It is what a user would write
by hand for single-precision QAT, so it is the yardstick for the overhead of the Double Rounding layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LSQConv2d", "LSQLinear", "lsq_quantize_model"]


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Forward ``x``, gradient ``scale * dx`` (LSQ paper, Fig. 2)."""
    y_grad = x * scale
    return (x - y_grad).detach() + y_grad


def round_pass(x: Tensor) -> Tensor:
    """Forward ``round(x)``, identity gradient."""
    return (x.round() - x).detach() + x


def lsq(x: Tensor, s: Tensor, q_n: int, q_p: int, n: int) -> Tensor:
    """LSQ fake-quant ``round(clamp(x / s, -Q_N, Q_P)) * s`` with ``s``'s gradient scaled by ``1/sqrt(N·Q_P)``."""
    g = 1.0 / math.sqrt(n * q_p)
    s = grad_scale(s, g)
    return round_pass(torch.clamp(x / s, -q_n, q_p)) * s


class _LSQMixin(nn.Module):
    """Weight and input scales of one layer; the input scale is initialised from the first batch."""

    def _init_quant(self, weight: Tensor, bits: int) -> None:
        self.bits = bits
        self.w_qn, self.w_qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        self.w_scale = nn.Parameter(2 * weight.detach().abs().mean() / math.sqrt(self.w_qp))
        self.a_scale = nn.Parameter(torch.ones(()))
        self.a_qn, self.a_qp = 0, 2**bits - 1
        self.a_ready = False

    def _quant_input(self, x: Tensor) -> Tensor:
        if not self.a_ready:
            with torch.no_grad():
                if bool((x < 0).any()):
                    self.a_qn, self.a_qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
                self.a_scale.fill_(2 * float(x.abs().mean()) / math.sqrt(self.a_qp))
            self.a_ready = True
        return lsq(x, self.a_scale, self.a_qn, self.a_qp, x[0].numel())


class LSQConv2d(nn.Conv2d, _LSQMixin):
    """``nn.Conv2d`` with LSQ weights and inputs."""

    def forward(self, x: Tensor) -> Tensor:
        w = lsq(self.weight, self.w_scale, self.w_qn, self.w_qp, self.weight.numel())
        return self._conv_forward(self._quant_input(x), w, self.bias)


class LSQLinear(nn.Linear, _LSQMixin):
    """``nn.Linear`` with LSQ weights and inputs."""

    def forward(self, x: Tensor) -> Tensor:
        w = lsq(self.weight, self.w_scale, self.w_qn, self.w_qp, self.weight.numel())
        return F.linear(self._quant_input(x), w, self.bias)


def lsq_quantize_model(model: nn.Module, bits: int, keep_fp: set[str]) -> nn.Module:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` not named in ``keep_fp`` for its LSQ version, in place."""
    for name, m in list(model.named_modules()):
        if name in keep_fp or type(m) not in (nn.Conv2d, nn.Linear):
            continue
        m.__class__ = LSQConv2d if isinstance(m, nn.Conv2d) else LSQLinear
        assert isinstance(m, _LSQMixin)
        m._init_quant(m.weight, bits)  # type: ignore[arg-type]
    return model
