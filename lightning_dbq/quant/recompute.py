"""Quantized convolutions that keep only the *unquantized* operands for the backward.

A quantized layer computes ``conv(Q_a(x), Q_w(W))``. Run as three autograd nodes, the convolution saves its two
operands, the fake-quantized input ``Q_a(x)`` and weight ``Q_w(W)``: two new full-size float tensors per layer (one
activation-sized, one weight-sized) on top of ``x``, which the layer before (ReLU, pooling, ...) keeps anyway, and
the latent ``W``. :func:`recomputed_conv` runs the three as one ``torch.autograd.Function`` that saves ``x``, ``W``
and the two scales instead, and rebuilds ``Q_a(x)`` and ``Q_w(W)`` in the backward (element-wise passes, cheap
next to the convolution). It saves what the unquantized ``conv(x, W)`` saves.

The forward makes the same fake-quant calls (without grad mode: nothing of them is kept) and the same convolution,
so its values are unchanged bit for bit. The backward rebuilds the operands, calls ``aten.convolution_backward``
with the arguments autograd's own convolution node passes, then applies the fake quantizers' backward:

* closed form, fused kernel (LSQ and Double Rounding, float32): the operand and its mask are rebuilt without a
  graph and the gradients computed in place, in the rebuilt operand's and the incoming gradient's buffers
  (:func:`~lightning_dbq.quant.fused.rebuild`, :func:`~lightning_dbq.quant.fused.operand_grads_`): the fused
  kernel's gradients bit for bit, with fewer passes than its own backward;
* closed form, compiled kernel: the operand is rebuilt by the compiled forward and the gradients come from one
  compiled no-grad graph (:func:`~lightning_dbq.quant.functional.lsq_grads`,
  :func:`~lightning_dbq.quant.functional.double_round_grads`): the input gradient is the fused kernel's bit for
  bit, the scale gradient agrees up to float32 summation order;
* otherwise (the ``eager`` reference, floor nesting, binary activations, other dtypes): the fake-quant call is
  re-run with its graph and differentiated (the plain path's gradients bit for bit).

Under ``create_graph=True`` (Hessian-vector products) the backward re-runs the whole forward with its graph and
differentiates that, so double backward is the composite one.

Applies to exact ``nn.Conv{1,2,3}d`` layers with zero padding, under grad mode, without autocast and outside
``torch.compile`` / ``torch.jit`` traces (:func:`recomputable`); everything else (linear layers, timm's conv
subclasses, binary weights, FQT's quantized backward) takes the plain path. The cost is the fake quantization
computed once more in the backward; with the fused kernel the closed form more than makes up for it (fewer passes
than the fused backward itself).

A fake quantizer enters as a :class:`FakeQuantOp` (a function of ``(x, scale)`` plus its constant arguments, fixed
when the forward runs: a bit switch or a scale update between forward and backward does not change what is
rebuilt) and the scale tensor (:meth:`~lightning_dbq.quant.act_quantizers.ActQuantizer.fake_quant_op`,
:meth:`~lightning_dbq.quant.quantizers.WeightQuantizer.fake_quant_op`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from lightning_dbq.quant.fused import Window, keep_for_backward, operand_grads_, rebuild

__all__ = ["FakeQuantOp", "Operand", "conv_geometry", "recomputable", "recomputed_conv"]

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]


class FakeQuantOp(NamedTuple):
    """A pure fake-quant function and its constant arguments: ``op(x, scale) == fn(x, scale, *args)``.

    ``window``: the op's closed form (LSQ / Double Rounding): the backward then rebuilds the operand and its
    gradients without a graph: with ``grads(dL/dy, x, scale, *args) -> (dL/dx, dL/dscale)`` after rebuilding the
    operand with ``fn`` (the compiled back-end), else in place (:func:`~lightning_dbq.quant.fused.rebuild`,
    the fused kernel). ``None``: the backward re-runs ``fn`` with its graph and differentiates it.
    """

    fn: Callable[..., Tensor]
    args: tuple[Any, ...] = ()
    window: Window | None = None
    grads: Callable[..., tuple[Tensor, Tensor]] | None = None

    def __call__(self, x: Tensor, scale: Tensor) -> Tensor:
        """Fake-quantize ``x`` with ``scale``."""
        return self.fn(x, scale, *self.args)


#: one operand of :func:`recomputed_conv`: ``(op, scale)`` fake-quantizes it, ``None`` passes it unchanged
Operand = tuple[FakeQuantOp, Tensor] | None


def conv_geometry(conv: nn.Module) -> Geometry | None:
    """``(stride, padding, dilation, groups)`` of a zero-padded ``nn.Conv{1,2,3}d`` with numeric padding, else
    ``None`` (string padding, other padding modes and transposed convolutions take the plain path)."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str):
        return None
    return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), int(conv.groups)  # type: ignore[arg-type]


def recomputable(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`recomputed_conv` applies: grad mode on, no autocast on ``x``'s device, not inside a
    ``torch.compile`` / ``torch.jit`` trace (they see the plain path), a batched input."""
    return (
        torch.is_grad_enabled()
        and x.dim() == weight.dim()
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )


def _apply(op: FakeQuantOp | None, t: Tensor, scale: Tensor | None) -> Tensor:
    """``op(t, scale)``, or ``t`` itself for no op."""
    return t if op is None or scale is None else op(t, scale)


Backward = Callable[[Tensor], list[Tensor | None]]


def _operand(t: Tensor, scale: Tensor | None, op: FakeQuantOp | None, needs: Sequence[bool]) -> tuple[Tensor, Backward]:
    """One rebuilt operand (no graph) and the function mapping its gradient to the gradients of ``(t, scale)``.

    Closed form (float32 ``t`` and ``scale``, :attr:`FakeQuantOp.window`): :func:`~lightning_dbq.quant.fused.rebuild`
    and :func:`~lightning_dbq.quant.fused.operand_grads_`, which overwrite the rebuilt value and the incoming gradient
    (both owned here). Otherwise ``op`` is re-run with its graph on leaves that require grad as the node's inputs
    do, and differentiated (a graph that lives only until then: fused kernels keep their output and mask in it,
    :func:`~lightning_dbq.quant.fused.keep_for_backward`).
    """
    if op is None or scale is None:
        return t, lambda g: [g, None]
    window, grads = op.window, op.grads
    if window is not None and t.dtype == scale.dtype == torch.float32:
        if grads is not None:  # the back-end's forward (no graph: grad mode is off here) and its gradient function
            y = op(t, scale)
            return y, lambda g: _needed(grads(g, t, scale, *op.args), needs)
        y, inside = rebuild(t, scale, window)
        return y, lambda g: list(operand_grads_(g, y, inside, t, scale, window, (needs[0], needs[1])))
    leaf, s_leaf = t.detach().requires_grad_(needs[0]), scale.detach().requires_grad_(needs[1])
    with torch.enable_grad(), keep_for_backward():
        out = op(leaf, s_leaf)
    edge = get_gradient_edge(out) if out.requires_grad else None
    return out.detach(), lambda g: _through(edge, g, [leaf, s_leaf])


def _needed(grads: tuple[Tensor, Tensor], needs: Sequence[bool]) -> list[Tensor | None]:
    """``grads`` with ``None`` for the inputs that need no gradient."""
    return [g if n else None for g, n in zip(grads, needs[:2], strict=True)]


def _through(edge: GradientEdge | None, grad: Tensor | None, inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """The gradients of ``inputs`` given ``grad`` at ``edge`` (``None`` for those that need none)."""
    wanted = [t for t in inputs if t.requires_grad]
    if edge is None or grad is None or not wanted:
        return [None] * len(inputs)
    found = iter(torch.autograd.grad([edge], wanted, [grad], allow_unused=True))
    return [next(found) if t.requires_grad else None for t in inputs]


def _conv_grads(
    gy: Tensor, x: Tensor, w: Tensor, b: Tensor | None, geometry: Geometry, mask: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``aten.convolution_backward`` as autograd's convolution node calls it: one call for the gradients ``mask``
    asks for (one call reorders ``gy`` once)."""
    stride, padding, dilation, groups = geometry
    bias_sizes = None if b is None else list(b.shape)
    found = torch.ops.aten.convolution_backward(gy, x, w, bias_sizes, list(stride), list(padding), list(dilation),
                                                False, [0] * len(stride), groups, list(mask))  # fmt: skip
    return found[0], found[1], found[2]


class _RecomputedConv(torch.autograd.Function):
    """``conv(op_x(x, s_x), op_w(w, s_w), b)`` saving ``(x, s_x, w, s_w, b)`` (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]  # noqa: D102
        ctx: Any, x: Tensor, s_x: Tensor | None, w: Tensor, s_w: Tensor | None, b: Tensor | None,
        ops: tuple[FakeQuantOp | None, FakeQuantOp | None], geometry: Geometry,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, s_x, w, s_w, b)
        ctx.ops, ctx.geometry = ops, geometry
        return _CONV[w.dim() - 2](_apply(ops[0], x, s_x), _apply(ops[1], w, s_w), b, *geometry)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]  # noqa: D102
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a re-run of the whole forward
            grads = _graph_grads(saved, needs, ctx.ops, ctx.geometry, gy)
        else:
            grads = _lean_grads(saved, needs, ctx.ops, ctx.geometry, gy)
        return (*grads, None, None)


def _lean_grads(
    saved: Sequence[Tensor | None], needs: Sequence[bool], ops: tuple[FakeQuantOp | None, FakeQuantOp | None],
    geometry: Geometry, gy: Tensor,
) -> list[Tensor | None]:  # fmt: skip
    """The gradients of ``(x, s_x, w, s_w, b)``: the fake-quantized operands rebuilt, the convolution's backward on
    them, then the fake quantizers' backward."""
    x, s_x, w, s_w, b = saved
    assert x is not None and w is not None
    xq, x_back = _operand(x, s_x, ops[0], needs[0:2])
    wq, w_back = _operand(w, s_w, ops[1], needs[2:4])
    mask = (bool(needs[0] or needs[1]), bool(needs[2] or needs[3]), bool(needs[4]))
    g_xq, g_wq, g_b = _conv_grads(gy, xq, wq, b, geometry, mask)
    del xq, wq  # the closed form keeps the rebuilt values (its backward writes into them); the graphs keep (x, s)
    g_x, g_sx = x_back(g_xq) if g_xq is not None else (None, None)  # None: neither x nor its scale needs one
    del g_xq, x_back
    g_w, g_sw = w_back(g_wq) if g_wq is not None else (None, None)
    return [g_x, g_sx, g_w, g_sw, g_b]


def _graph_grads(
    saved: Sequence[Tensor | None], needs: Sequence[bool], ops: tuple[FakeQuantOp | None, FakeQuantOp | None],
    geometry: Geometry, gy: Tensor,
) -> list[Tensor | None]:  # fmt: skip
    """The gradients of ``(x, s_x, w, s_w, b)`` with their own graph (``create_graph=True``)."""
    x, s_x, w, s_w, b = saved
    assert x is not None and w is not None
    y = _CONV[w.dim() - 2](_apply(ops[0], x, s_x), _apply(ops[1], w, s_w), b, *geometry)
    wanted = [t for t, n in zip(saved, needs, strict=True) if n and t is not None]
    found = iter(torch.autograd.grad(y, wanted, gy, create_graph=True, allow_unused=True))
    return [next(found) if n and t is not None else None for t, n in zip(saved, needs, strict=True)]


def recomputed_conv(x: Tensor, x_quant: Operand, weight: Tensor, w_quant: Operand, bias: Tensor | None,
                    geometry: Geometry) -> Tensor:  # fmt: skip
    """``conv(Q_a(x), Q_w(weight), bias)`` that saves ``x``, ``weight`` and the scales, not the quantized operands.

    Args:
        x: the unquantized input ``(N, C, *spatial)``.
        x_quant: the input's fake quantizer ``(op, scale)``, ``None``: the input is used as it is.
        weight: the unquantized (latent) weight; its dimension picks ``conv1d/2d/3d``.
        w_quant: the weight's fake quantizer ``(op, scale)``, ``None``: the weight is used as it is.
        bias: optional bias.
        geometry: ``(stride, padding, dilation, groups)`` (:func:`conv_geometry`).
    """
    ops = (None if x_quant is None else x_quant[0], None if w_quant is None else w_quant[0])
    s_x = None if x_quant is None else x_quant[1]
    s_w = None if w_quant is None else w_quant[1]
    return _RecomputedConv.apply(x, s_x, weight, s_w, bias, ops, geometry)  # type: ignore[no-any-return]
