"""One ``autograd.Function`` per layer type whose backward quantizes the output gradient ``gY`` (FQT).

The forward is the plain ``conv``/``linear`` and saves only ``x`` and ``w``. The backward builds the estimates
inside (nothing quantized is kept between passes):

* input gradient ``gX = conv_input_grad(W, Q_sample(gY))`` — per-sample groups (rows ``gY[n]``), so with integer
  codes ``gX[n] = S_n⁻¹·(q_n ⊛ Wᵀ) + z_n·(1 ⊛ Wᵀ)``;
* weight gradient ``gW = conv_weight_grad(X, Q_channel(gY))`` — per-output-channel groups (``gY[:, c]``), so
  ``gW[c] = S_c⁻¹·(q_cᵀ X) + z_c·(1ᵀ X)``; with ``scq=False`` it reuses the per-sample copy instead;
* bias gradient ``gY`` summed over every axis but the channel one, in full precision.

Linear layers treat every row of the 2-D view ``gY.reshape(-1, out_features)`` as a sample (a token of a 3-D
input is a sample). ``Q`` is ``GRAD_METHODS[config.method]`` (:mod:`lightning_dbq.fqt.grad_quant`), looked up at
backward time; its noise and masks come from the given ``torch.Generator`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import grad as nn_grad

from lightning_dbq.fqt.config import GradQuantConfig
from lightning_dbq.fqt.grad_quant import GRAD_METHODS
from lightning_dbq.fqt.stats import record_estimate

__all__ = ["PROFILE_RANGE", "fqt_conv", "fqt_linear", "quantize_conv_grad", "quantize_linear_grad"]

_IntOrSeq = int | Sequence[int]
#: ``torch.profiler`` range around the gradient estimators of every FQT backward (the simulated quantization cost)
PROFILE_RANGE = "dbq.fqt.quantize_grad"
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: nn_grad.conv1d_input, 2: nn_grad.conv2d_input, 3: nn_grad.conv3d_input}
_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}


def quantize_conv_grad(
    gy: Tensor, config: GradQuantConfig, generator: torch.Generator | None, need_x: bool = True, need_w: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """The two estimates of a conv output gradient ``gy`` ``(N, C, *spatial)``: ``(for gX, for gW)``.

    The per-sample copy is drawn first, then the per-channel one (``scq``); ``None`` for a path not needed.
    """
    method = GRAD_METHODS[config.method]
    n, c = gy.shape[:2]
    gy_x = gy_w = None
    if need_x or (need_w and not config.scq):
        rows_x = gy.reshape(n, -1)
        gy_x = method.sample(rows_x, config.bits, config.keep, generator)
        record_estimate("x", rows_x, gy_x, config.bits)
        gy_x = gy_x.reshape(gy.shape)
    if need_w:
        if config.scq:
            rows = gy.transpose(0, 1).reshape(c, -1)
            gy_w = method.channel(rows, config.bits, config.keep, generator)
            record_estimate("w", rows, gy_w, config.bits)
            gy_w = gy_w.reshape(c, n, *gy.shape[2:]).transpose(0, 1)
        else:
            gy_w = gy_x
    return gy_x, gy_w


def quantize_linear_grad(
    gy2: Tensor, config: GradQuantConfig, generator: torch.Generator | None, need_x: bool = True, need_w: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """The two estimates of a linear output gradient viewed as ``(rows, out_features)``: ``(for gX, for gW)``."""
    method = GRAD_METHODS[config.method]
    gy_x = gy_w = None
    if need_x or (need_w and not config.scq):
        gy_x = method.sample(gy2, config.bits, config.keep, generator)
        record_estimate("x", gy2, gy_x, config.bits)
    if need_w and config.scq:
        gy_w = method.channel(gy2.t(), config.bits, config.keep, generator)
        record_estimate("w", gy2.t(), gy_w, config.bits)
        gy_w = gy_w.t()
    elif need_w:
        gy_w = gy_x
    return gy_x, gy_w


class _ConvFQT(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, config: GradQuantConfig, generator: Any, geometry: tuple
    ) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.config, ctx.generator, ctx.geometry = config, generator, geometry
        return _CONV[w.dim() - 2](x, w, b, *geometry)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.profiler.record_function(PROFILE_RANGE):
            gy_x, gy_w = quantize_conv_grad(gy, ctx.config, ctx.generator, need_x, need_w)
        dims = w.dim() - 2
        gx = _CONV_INPUT[dims](x.shape, w, gy_x, *ctx.geometry) if need_x else None
        gw = _CONV_WEIGHT[dims](x, w.shape, gy_w, *ctx.geometry) if need_w else None
        gb = gy.sum(dim=[0, *range(2, gy.dim())]) if need_b else None
        return gx, gw, gb, None, None, None


class _LinearFQT(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, config: GradQuantConfig, generator: Any
    ) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.config, ctx.generator = config, generator
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy2 = gy.reshape(-1, gy.shape[-1])
        with torch.profiler.record_function(PROFILE_RANGE):
            gy_x, gy_w = quantize_linear_grad(gy2, ctx.config, ctx.generator, need_x, need_w)
        gx = (gy_x @ w).reshape(x.shape) if need_x else None
        gw = gy_w.t() @ x.reshape(-1, x.shape[-1]) if gy_w is not None else None
        gb = gy2.sum(0) if need_b else None
        return gx, gw, gb, None, None


def _check_generator(generator: Any, where: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"{where}: generator must be a torch.Generator on the tensors' device, got {type(generator).__name__} "
            "(the global RNG is never used; enable_grad_quant gives every layer its own)"
        )


def fqt_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    config: GradQuantConfig,
    generator: torch.Generator,
    stride: _IntOrSeq = 1,
    padding: _IntOrSeq = 0,
    dilation: _IntOrSeq = 1,
    groups: int = 1,
) -> Tensor:
    """``conv{1,2,3}d(x, weight, bias, ...)`` whose backward quantizes ``gY`` as ``config`` says.

    Args:
        x: batched input ``(N, C_in, *spatial)``.
        weight: ``(C_out, C_in/groups, *kernel)``; its dimension picks conv1d/2d/3d.
        bias: optional ``(C_out,)``; its gradient is exact.
        config: the gradient quantization.
        generator: source of every random draw of the backward (on the tensors' device; never the global RNG).
        stride, padding, dilation, groups: as ``F.conv2d``; ``padding`` must be numeric (pad ``"same"`` first).

    Raises:
        ValueError: a string padding, a weight that is not 3-, 4- or 5-D, or no generator.
    """
    _check_generator(generator, "fqt_conv")
    if isinstance(padding, str):
        raise ValueError(f"fqt_conv: padding must be an int or a tuple, got {padding!r}; pad the input first")
    if weight.dim() - 2 not in _CONV:
        raise ValueError(f"fqt_conv: weight must be 3-, 4- or 5-D (conv1d/2d/3d), got shape {tuple(weight.shape)}")
    return _ConvFQT.apply(x, weight, bias, config, generator, (stride, padding, dilation, groups))  # type: ignore[no-any-return]


def fqt_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, config: GradQuantConfig, generator: torch.Generator
) -> Tensor:
    """``F.linear(x, weight, bias)`` (any leading dims) whose backward quantizes ``gY`` as ``config`` says.

    Raises:
        ValueError: no generator (``generator`` is the only source of the backward's random draws).
    """
    _check_generator(generator, "fqt_linear")
    return _LinearFQT.apply(x, weight, bias, config, generator)  # type: ignore[no-any-return]
