"""ONNX export of one bit configuration as an int8 QDQ graph (``mode="exact"``; ``mode="integer"``: see
:mod:`lightning_dbq.export.integer`).

Every configuration of a Double Rounding model is exactly an int8 QDQ graph:

* weights: int8 initializers holding the codes ``c = q_l·2^(h−l)`` (the ``h``-bit grid, so every bit-width fits
  int8 when ``h ≤ 8``) with the shared scale ``s_h`` (per tensor, or per output channel, axis 0), feeding a
  ``DequantizeLinear``; no float copy of a quantized weight is left in the file;
* activations: ``QuantizeLinear → DequantizeLinear`` with the layer's activation scale ``s_b`` and zero point 0,
  ``uint8`` when unsigned (``lo = 0``), ``int8`` when signed, preceded by a ``Clip`` to ``[lo·s, hi·s]`` when
  ``b < 8`` (``QuantizeLinear`` saturates to the 8-bit range only).

Parity: the weights dequantize to exactly the frozen model's folded weights. ONNX rounds activations half to even
where lightning_dbq rounds half up (``floor(x/s + 1/2)``), so a code exactly at a tie can differ by one step; the
effect is measured (tests/export/test_onnx_export.py), not assumed to be zero.

``onnx`` is imported only here, and only when :func:`export_onnx` runs; ``onnxruntime`` is not needed to export.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dbq.quant.convert import WEIGHT_SCALE_ATTR, FrozenActQuant, freeze

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["EXPORT_MODES", "OnnxActQuant", "export_onnx"]

EXPORT_MODES = ("exact", "integer")


def _require_onnx() -> Any:
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lightning_dbq.export.export_onnx needs the 'onnx' package: install the onnx extra "
            "(pip install 'lightning-dbq[onnx]', which also brings onnxruntime)"
        ) from e
    return onnx


class OnnxActQuant(nn.Module):
    """Export stand-in for :class:`~lightning_dbq.quant.convert.FrozenActQuant`: an ONNX Q/DQ pair.

    ``fake_quantize_per_tensor_affine(clamp(x, lo·s, hi·s), s, 0, qmin, qmax)`` with ``(qmin, qmax) = (0, 255)``
    (unsigned) or ``(-128, 127)`` (signed): the legacy exporter emits ``[Clip →] QuantizeLinear → DequantizeLinear``.
    Rounds half to even (PyTorch's and ONNX's rule), so it may differ from the frozen quantizer by one step on ties.

    Args:
        frozen: the frozen quantizer to mimic (its scale, bits and sign).
    """

    def __init__(self, frozen: FrozenActQuant) -> None:
        super().__init__()
        self.bits = frozen.bits
        self.signed = frozen.signed
        self.lo, self.hi = frozen.lo, frozen.hi
        self.scale = float(frozen.scale)  # a float32 value, exact as a Python float
        self.qmin, self.qmax = (-128, 127) if self.signed else (0, 255)

    def forward(self, x: Tensor) -> Tensor:
        """Clip to the ``b``-bit range (when ``b < 8``), then quantize-dequantize on the 8-bit grid."""
        s = self.scale
        if self.bits < 8:
            x = torch.clamp(x, self.lo * s, self.hi * s)
        return torch.fake_quantize_per_tensor_affine(x, s, 0, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, scale={self.scale:.6g}"


class _WeightQDQ(nn.Module):
    """Parametrization ``w ↦ fake_quant(w, s_h)`` on the int8 grid (per tensor, or per channel on axis 0)."""

    zero_point: Tensor
    channel_scale: Tensor

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.per_channel = scale.numel() > 1
        if self.per_channel:
            self.register_buffer("channel_scale", scale.detach().float().reshape(-1).clone())
            self.register_buffer("zero_point", torch.zeros(scale.numel(), dtype=torch.int32))
        else:
            self.tensor_scale = float(scale.reshape(()))

    def forward(self, w: Tensor) -> Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, self.channel_scale, self.zero_point, 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(w, self.tensor_scale, 0, -128, 127)


def _check_codes(w: Tensor, scale: Tensor, name: str) -> None:
    """``w`` must be ``c·s`` exactly (float32) with integer codes ``c = round(w/s)`` in int8 (``w/s`` itself may be
    one ulp off an integer)."""
    s = scale.detach().float().reshape((-1,) + (1,) * (w.dim() - 1)) if scale.numel() > 1 else scale.float()
    w = w.detach().float()
    c = torch.round(w / s)
    if not torch.equal(c * s, w) or bool((c < -128).any()) or bool((c > 127).any()):  # pragma: no cover
        raise ValueError(f"export_onnx(): layer {name!r}: weight is not an int8 multiple of its scale (high bits > 8?)")


def exportable(frozen: nn.Module) -> nn.Module:
    """A deep copy of a frozen model whose quantizers trace to ONNX Q/DQ nodes.

    Every :class:`FrozenActQuant` becomes an :class:`OnnxActQuant`; every layer carrying ``dbq_weight_scale``
    gets its ``weight`` parametrized as ``fake_quant(weight, s_h)`` (an identity on the folded weight's values).
    """
    m = copy.deepcopy(frozen)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, FrozenActQuant):
            parent_name, _, child = name.rpartition(".")
            parent = m.get_submodule(parent_name) if parent_name else m
            setattr(parent, child, OnnxActQuant(mod))
    for name, mod in list(m.named_modules()):
        scale = getattr(mod, WEIGHT_SCALE_ATTR, None)
        if isinstance(scale, Tensor) and isinstance(getattr(mod, "weight", None), Tensor):
            _check_codes(mod.weight, scale, name)
            parametrize.register_parametrization(mod, "weight", _WeightQDQ(scale), unsafe=True)
    return m.eval()


def _fold_weight_quantize(model: onnx.ModelProto) -> int:
    """Replace each ``QuantizeLinear`` of a float initializer by an int8 initializer of its codes; drop dead
    nodes and initializers. Returns the number of weights folded."""
    onnx = _require_onnx()
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts: dict[str, Any] = {}
    for node in graph.node:  # scalar/vector Constant nodes (scales, zero points) as well as initializers
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def value(name: str) -> Any:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    folded = 0
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype.kind != "f":
            continue
        scale = value(node.input[1])
        zp = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:  # pragma: no cover - a scale computed at run time
            continue
        if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            raise ValueError(f"export_onnx(): weight {node.input[0]!r}: expected an int8 zero point 0")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        s = np.asarray(scale, dtype=np.float32)
        if s.ndim == 1 and s.size > 1:
            shape = [1] * w.ndim
            shape[axis] = s.size
            s = s.reshape(shape)
        w = w.astype(np.float32)
        codes = np.round(w / s)  # exact integers: w == codes·s (checked), so DequantizeLinear restores w bit for bit
        if not np.array_equal((codes * s).astype(np.float32), w) or codes.min() < -128 or codes.max() > 127:
            raise ValueError(f"export_onnx(): weight {node.input[0]!r} is not an int8 multiple of its scale")
        new_name = node.output[0] + "_int8"
        graph.initializer.append(numpy_helper.from_array(codes.astype(np.int8), new_name))
        rename[node.output[0]] = new_name
        drop.add(i)
        folded += 1
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
    for out in graph.output:
        if out.name in rename:  # pragma: no cover - a weight is never a graph output
            out.name = rename[out.name]
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    # remove dead nodes (outputs nobody reads) and unused initializers, to a fixed point
    graph_outputs = {o.name for o in graph.output}
    while True:
        used = {name for n in kept for name in n.input} | graph_outputs
        alive = [n for n in kept if any(o in used for o in n.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in kept for name in n.input} | graph_outputs
    alive_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive_inits)
    onnx.checker.check_model(model)
    return folded


def _write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(
    model: nn.Module,
    bits_or_config: int | Mapping[str, int],
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    mode: str = "exact",
    calibration_data: Iterable[Tensor] | None = None,
    fp_layers: str = "int8",
    opset: int = 17,
) -> Path:
    """Export one bit configuration of a prepared model to an ONNX file (an int8 QDQ graph).

    ``mode="exact"``: weights as int8 code initializers + ``DequantizeLinear`` (scale ``s_h``), activations as
    ``[Clip →] QuantizeLinear → DequantizeLinear`` (module docstring). The graph has one input ``"input"`` and one
    output ``"logits"``, both with a dynamic batch dimension. ONNX Runtime may fuse the Q/DQ pairs into integer
    kernels (``QLinearConv``) when it optimizes the graph.

    Args:
        model: a prepared model whose activation scales are set (as :func:`~lightning_dbq.freeze` needs).
        bits_or_config: one ``int`` for every quantized layer, or ``{layer_name: bits}`` (as ``freeze`` accepts).
        path: the ``.onnx`` file to write (its folder is created; written atomically: temp file + rename).
        example_input: one input batch used to trace the model (any batch size).
        mode: ``"exact"`` or ``"integer"`` (:mod:`lightning_dbq.export.integer`: norms folded into the weight
            scales, calibrated 8-bit Q/DQ on the remaining float edges, int32 biases, so that ONNX Runtime runs
            every quantized convolution as ``QLinearConv``; approximate — measure it).
        calibration_data: ``integer`` mode only (required there): a few preprocessed input batches (tensors) to
            calibrate the added 8-bit edges; a few hundred images are plenty.
        fp_layers: ``integer`` mode only: ``"int8"`` (default) gives the model's FP first/last layers 8-bit
            per-channel weights and 8-bit inputs too, so the whole network runs on integer kernels; ``"float"``
            keeps them as trained (an FP32 stem and its max-pool cost a third of resnet18's integer run time).
        opset: ONNX opset (13 or later: per-channel ``QuantizeLinear``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: an unknown ``mode``; whatever :func:`~lightning_dbq.freeze` raises (model not prepared,
            uninitialised activation scales, bad config); weights whose codes do not fit int8.
        ValueError: ``mode="integer"`` without ``calibration_data`` (or with an empty one), or ``calibration_data``
            given in ``exact`` mode.
        ImportError: ``onnx`` is not installed (the ``onnx`` extra).
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"export_onnx(): mode must be one of {list(EXPORT_MODES)}, got {mode!r}")
    batches: list[np.ndarray] = []
    if mode == "integer":
        if calibration_data is None:
            raise ValueError(
                "export_onnx(): mode='integer' needs calibration_data (a few preprocessed input batches) to "
                "calibrate the 8-bit edges it adds"
            )
        batches = [np.asarray(torch.as_tensor(x).detach().float().cpu().numpy()) for x in calibration_data]
        if not batches:
            raise ValueError("export_onnx(): calibration_data is empty; give a few preprocessed input batches")
    elif calibration_data is not None:
        raise ValueError("export_onnx(): calibration_data is only used by mode='integer'")
    onnx = _require_onnx()
    out = Path(path)
    frozen = freeze(model, bits_or_config)
    m = exportable(frozen)
    with tempfile.TemporaryDirectory(prefix="dbq_onnx_") as tmp, torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            m,
            (example_input,),
            raw,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        proto = onnx.load(str(raw))
    _fold_weight_quantize(proto)
    if mode == "integer":
        from lightning_dbq.export.integer import integerize

        integerize(proto, batches, fp_layers=fp_layers)
    _write_atomic(proto.SerializeToString(), out)
    return out
