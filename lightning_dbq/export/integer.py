"""``mode="integer"``: turn an exact int8 QDQ graph into one whose quantized layers run as integer kernels.

ONNX Runtime forms an integer kernel (``QLinearConv``, ``QLinearMatMul``, ``QLinearAdd``, ...) only from the
pattern ``DequantizeLinear → op → QuantizeLinear`` with constant scales: every float input of the op must come from
a ``DequantizeLinear`` and its output must go only to ``QuantizeLinear`` nodes. The exact graph leaves float edges
(batch norms after convolutions, residual adds, pooling, a float ``Clip`` in front of each trained quantizer), so
the runtime keeps most convolutions in float. This pass closes those edges, in order:

1. **Constants**: ``Constant`` nodes and ``Identity`` copies of initializers become initializers.
2. **Norm folding**: a ``BatchNormalization`` that reads a convolution's output alone is folded into it. For a
   quantized convolution the int8 codes stay; the per-output-channel factor ``k = γ/√(σ²+ε)`` moves into the weight
   scale (``|k|·s_h``, per channel; a negative ``k`` negates the codes, and a code of −128 saturates to 127 — counted
   in the report). A float convolution's weight is multiplied by ``k``.
3. **Clamps into quantizers**: a trained quantizer ``Clip(lo·s, hi·s) → Q(s)`` becomes ``Q(s) → Clip(lo, hi)`` on
   the integer codes (identical values), and a ``Relu``/``Clip`` in front of it is skipped when the quantizer's code
   range already implies it (an unsigned quantizer with zero point 0 clamps at 0 by itself).
4. **Calibrated 8-bit edges**: identical nodes are merged first (the exporter leaves one quantizer per reading
   layer, and the runtime fuses ``op → Q`` only when that Q is the op's single reader). Then every remaining float
   input or output of an integer-capable op (quantized ``Conv``/``Gemm``/``MatMul``, ``Add``, pooling) gets a
   ``QuantizeLinear → DequantizeLinear`` pair, ``uint8`` with the min/max range seen on the calibration batches
   (:func:`calibrated_scale`). A ``Relu`` reading such an output is absorbed into its quantizer (range from 0).
5. **Int32 bias**: the bias of each quantized convolution or ``Gemm`` becomes ``DequantizeLinear`` of int32 codes
   with scale ``s_x·s_w`` (the runtime's integer kernels accumulate in int32 and require this form).

Steps 1–3 and 5 change no value beyond float rounding (5: by at most half a step of ``s_x·s_w``); step 4 is the
approximation, measured in ``tests/export/test_onnx_integer.py`` and ``docs/serving.md``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["FP_LAYERS", "IntegerReport", "calibrated_scale", "integerize"]

# ops whose inputs and output are quantized so the runtime runs them on integers (the weighted ones only when their
# weight is an int8 DequantizeLinear, i.e. a quantized layer)
_WEIGHTED = ("Conv", "Gemm")
_INTEGER_CAPABLE = ("Add", "GlobalAveragePool", "AveragePool", "MaxPool")
FP_LAYERS = ("int8", "float")


@dataclass
class IntegerReport:
    """What :func:`integerize` changed.

    Attributes:
        folded_norms: batch norms folded into the preceding convolution.
        saturated_codes: int8 codes of −128 negated by a negative norm factor and saturated to 127.
        absorbed_clamps: ``Relu``/``Clip`` nodes absorbed into a trained quantizer.
        calibrated_edges: tensors given a calibrated 8-bit ``QuantizeLinear → DequantizeLinear`` pair.
        int32_biases: biases turned into int32 codes.
        fp_layers_quantized: FP first/last layers given int8 weights (``fp_layers="int8"``).
    """

    folded_norms: int = 0
    saturated_codes: int = 0
    absorbed_clamps: int = 0
    calibrated_edges: int = 0
    int32_biases: int = 0
    fp_layers_quantized: int = 0


def calibrated_scale(lo: float, hi: float, signed: bool = False) -> tuple[float, int]:
    """The ``uint8`` step and zero point for a tensor observed in ``[lo, hi]`` (the range widened to hold 0).

    ``scale = (hi − lo)/255`` (never below ``1e-8``), ``zero_point = round(−lo/scale)`` in ``[0, 255]``: 0 for a
    non-negative tensor. ``uint8`` activations are what ONNX Runtime's x86 integer kernels take natively (signed
    ones are converted first). ``signed=True``: the same grid as ``int8`` (zero point shifted by −128), for an
    edge whose integer kernel reads ``int8`` (input and output of one kernel must share the type).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zero_point = int(np.clip(np.round(-lo / scale), 0, 255))
    return scale, zero_point - 128 if signed else zero_point


class _Graph:
    """A small mutable view of an ONNX graph: initializers as NumPy arrays, producer/consumer maps on demand."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.nh = numpy_helper
        self.inits: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.nodes: list[Any] = list(self.graph.node)
        self.outputs = {o.name for o in self.graph.output}
        self._uid = 0

    def name(self, base: str) -> str:
        self._uid += 1
        return f"{base}__dbq{self._uid}"

    def const(self, base: str, value: np.ndarray) -> str:
        n = self.name(base)
        self.inits[n] = value
        return n

    def producers(self) -> dict[str, Any]:
        return {o: n for n in self.nodes for o in n.output}

    def consumers(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    out[i].append(n)
        return out

    def value(self, name: str) -> np.ndarray | None:
        return self.inits.get(name)

    def replace_uses(self, old: str, new: str, skip: Any = None) -> None:
        for n in self.nodes:
            if n is skip:
                continue
            for j, i in enumerate(n.input):
                if i == old:
                    n.input[j] = new

    def finish(self) -> None:
        """Drop dead nodes and unused initializers, sort topologically, write back into the proto."""
        import onnx

        nodes = self.nodes
        while True:
            used = {i for n in nodes for i in n.input} | self.outputs
            alive = [n for n in nodes if any(o in used for o in n.output)]
            if len(alive) == len(nodes):
                break
            nodes = alive
        avail = {i.name for i in self.graph.input} | set(self.inits)
        ordered: list[Any] = []
        pending = list(nodes)
        while pending:
            ready = [n for n in pending if all((not i) or i in avail for i in n.input)]
            if not ready:  # pragma: no cover - a cycle would be a bug of this pass
                raise ValueError("export_onnx(integer): the rewritten graph is not acyclic")
            for n in ready:
                ordered.append(n)
                avail.update(n.output)
            pending = [n for n in pending if all(n is not r for r in ready)]
        used = {i for n in ordered for i in n.input} | self.outputs
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        del self.graph.initializer[:]
        self.graph.initializer.extend(self.nh.from_array(v, k) for k, v in self.inits.items() if k in used)
        del self.graph.value_info[:]
        self.nodes = ordered
        onnx.checker.check_model(self.model)


def _inline_constants(g: _Graph) -> None:
    from onnx import numpy_helper

    kept = []
    for n in g.nodes:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            g.inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in g.inits and n.output[0] not in g.outputs:
            g.inits[n.output[0]] = g.inits[n.input[0]]
        else:
            kept.append(n)
    g.nodes = kept


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _int8_weight_dq(g: _Graph, producers: dict[str, Any], node: Any) -> Any | None:
    """The ``DequantizeLinear`` of an int8 initializer feeding ``node``'s weight input, or None."""
    if len(node.input) < 2:
        return None
    dq = producers.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    codes = g.value(dq.input[0])
    return dq if codes is not None and codes.dtype == np.int8 else None


def _fold_weight_transposes(g: _Graph) -> None:
    """``DQ(int8 codes) → Transpose`` (how a ``Linear`` on 3-D input exports) becomes ``DQ(transposed codes)``."""
    from onnx import helper

    producers, consumers = g.producers(), g.consumers()
    for tr in [n for n in g.nodes if n.op_type == "Transpose"]:
        dq = producers.get(tr.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers[dq.output[0]]) != 1:
            continue
        codes = g.value(dq.input[0])
        if codes is None or codes.dtype != np.int8:
            continue
        perm = list(_attr(tr, "perm", list(range(codes.ndim))[::-1]))
        scale = g.value(dq.input[1])
        if scale is None:
            continue
        axis = int(_attr(dq, "axis", 1)) % codes.ndim
        new_axis = perm.index(axis)
        inputs = [g.const(dq.input[0], np.ascontiguousarray(codes.transpose(perm))), *dq.input[1:]]
        new = helper.make_node("DequantizeLinear", inputs, [tr.output[0]], axis=new_axis)
        g.nodes[g.nodes.index(tr)] = new
        g.nodes.remove(dq)


def _fold_norms(g: _Graph, report: IntegerReport) -> None:
    from onnx import helper

    producers, consumers = g.producers(), g.consumers()
    for bn in [n for n in g.nodes if n.op_type == "BatchNormalization"]:
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(consumers[bn.input[0]]) != 1 or len(bn.output) != 1:
            continue
        params = [g.value(i) for i in bn.input[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)  # type: ignore[arg-type]
        k = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(k)
        if bias is None:
            continue
        dq = _int8_weight_dq(g, producers, conv)
        if dq is not None:
            codes = g.value(dq.input[0])
            scale = g.value(dq.input[1])
            assert codes is not None and scale is not None
            s = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), k.shape)
            sign = np.where(k < 0, -1, 1).reshape((-1,) + (1,) * (codes.ndim - 1))
            flipped = codes.astype(np.int32) * sign
            report.saturated_codes += int((flipped > 127).sum())
            new_codes = np.clip(flipped, -128, 127).astype(np.int8)
            new_scale = (s * np.abs(k)).astype(np.float32)
            new_scale = np.where(new_scale > 0, new_scale, np.float32(1e-12)).astype(np.float32)
            zp = g.const(dq.input[0] + "_zp", np.zeros(k.shape, dtype=np.int8))
            w_name = g.name(dq.output[0])
            new_dq = helper.make_node(
                "DequantizeLinear",
                [g.const(dq.input[0], new_codes), g.const(dq.input[1], new_scale), zp],
                [w_name],
                axis=0,
            )
            g.nodes.insert(g.nodes.index(conv), new_dq)
            conv.input[1] = w_name
        else:
            w = g.value(conv.input[1])
            if w is None:
                continue
            folded = (w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            conv.input[1] = g.const(conv.input[1], folded)
        new_bias = ((np.asarray(bias, dtype=np.float64) - mean) * k + beta).astype(np.float32)
        b_name = g.const(conv.name or "conv_bias", new_bias)
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        g.replace_uses(bn.output[0], conv.output[0])
        if bn.output[0] in g.outputs:  # pragma: no cover - a norm is never the graph output here
            continue
        g.nodes.remove(bn)
        report.folded_norms += 1


def _code_range(q: Any, g: _Graph) -> tuple[float, int, int, np.dtype[Any]] | None:
    """(scale, qmin, qmax, dtype) of an activation ``QuantizeLinear`` with a constant scalar scale and zero point 0."""
    scale = g.value(q.input[1])
    zp = g.value(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or scale.size != 1 or zp is None or zp.size != 1 or int(zp.reshape(())) != 0:
        return None
    info = np.iinfo(zp.dtype)
    return float(scale.reshape(())), int(info.min), int(info.max), zp.dtype


def _clip_bounds(node: Any, g: _Graph) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    lo = g.value(node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(-np.inf)
    hi = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(np.inf)
    if lo is None or hi is None:
        return None
    return float(lo.reshape(())), float(hi.reshape(()))


def _quantize_scalar(v: float, s: float, qmin: int, qmax: int) -> int:
    """ONNX ``QuantizeLinear`` of one float32 value (round half to even, saturate)."""
    if v == np.inf:
        return qmax
    if v == -np.inf:
        return qmin
    return int(np.clip(np.round(np.float32(v) / np.float32(s)), qmin, qmax))


def _feeds_matmul(g: _Graph, q: Any) -> bool:
    consumers = g.consumers()
    return any(c.op_type == "MatMul" for dq in consumers[q.output[0]] for c in consumers[dq.output[0]])


def _absorb_clamps(g: _Graph, report: IntegerReport) -> None:
    """Step 3: move each trained quantizer's float Clip onto its integer codes; skip implied Relu/Clip."""
    from onnx import helper

    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear" and n.input[0] not in g.inits]:
        rng = _code_range(q, g)
        if rng is None or _feeds_matmul(g, q):
            continue  # the runtime's MatMul fusions want Q → DQ → MatMul with nothing in between
        s, qmin, qmax, dtype = rng
        lo_code, hi_code = qmin, qmax
        while True:
            src = g.producers().get(q.input[0])
            bounds = None if src is None else _clip_bounds(src, g)
            if src is None or bounds is None:
                break
            # Q is monotone, so Q(clip(x, lo, hi)) == clip(Q(x), Q(lo), Q(hi)): the clamp moves onto the codes
            lo_c, hi_c = (_quantize_scalar(v, s, qmin, qmax) for v in bounds)
            lo_code, hi_code = max(lo_code, lo_c), min(hi_code, hi_c)
            q.input[0] = src.input[0]
            report.absorbed_clamps += 1
        hi_code = max(hi_code, lo_code)
        if (lo_code, hi_code) != (qmin, qmax):
            clipped = g.name(q.output[0] + "_clip")
            node = helper.make_node(
                "Clip",
                [q.output[0], g.const("clip_lo", np.array(lo_code, dtype=dtype)),
                 g.const("clip_hi", np.array(hi_code, dtype=dtype))],
                [clipped],
            )  # fmt: skip
            g.replace_uses(q.output[0], clipped)
            g.nodes.insert(g.nodes.index(q) + 1, node)


def _is_quantized_weighted(g: _Graph, producers: dict[str, Any], node: Any) -> bool:
    return node.op_type in _WEIGHTED and _int8_weight_dq(g, producers, node) is not None


def _integer_nodes(g: _Graph) -> list[Any]:
    producers = g.producers()
    out = []
    for n in g.nodes:
        if n.op_type == "Add" and any(i in g.inits for i in n.input):
            continue  # a bias add: left to the runtime's MatMul/Gemm fusions
        if n.op_type in _INTEGER_CAPABLE or _is_quantized_weighted(g, producers, n):
            out.append(n)
    return out


def _activation_inputs(g: _Graph, producers: dict[str, Any], node: Any) -> list[str]:
    if node.op_type in _WEIGHTED:
        return [node.input[0]]
    return [i for i in node.input if i and i not in g.inits]


def _ranges(
    model: onnx.ModelProto, names: Sequence[str], batches: Iterable[np.ndarray]
) -> dict[str, tuple[float, float]]:
    """Min/max of every named tensor over the calibration batches (ONNX Runtime, no graph optimization)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    out: dict[str, tuple[float, float]] = {}
    seen = 0
    for x in batches:
        values = sess.run(list(names), {input_name: np.ascontiguousarray(x, dtype=np.float32)})
        for name, v in zip(names, values, strict=True):
            lo, hi = float(np.min(v)), float(np.max(v))
            if name in out:
                lo, hi = min(lo, out[name][0]), max(hi, out[name][1])
            out[name] = (lo, hi)
        seen += 1
    if seen == 0:
        raise ValueError("export_onnx(integer): calibration_data is empty; give a few input batches")
    return out


def _node_key(g: _Graph, node: Any) -> tuple[Any, ...]:
    def ref(name: str) -> Any:
        v = g.inits.get(name)
        return ("init", v.dtype.str, v.shape, v.tobytes()) if v is not None else name

    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return (node.op_type, node.domain, tuple(ref(i) for i in node.input), attrs, len(node.output))


def _merge_duplicates(g: _Graph) -> None:
    """Common-subexpression elimination: nodes with the same op, equal inputs and attributes become one."""
    while True:
        seen: dict[tuple[Any, ...], Any] = {}
        merged = False
        for node in list(g.nodes):
            if any(o in g.outputs for o in node.output):
                continue
            key = _node_key(g, node)
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for old, new in zip(node.output, first.output, strict=True):
                g.replace_uses(old, new)
            g.nodes.remove(node)
            merged = True
        if not merged:
            return


def _insert_edges(g: _Graph, batches: Sequence[np.ndarray], report: IntegerReport) -> None:
    """Step 4: calibrated 8-bit Q/DQ pairs on the float edges of integer-capable ops, in topological order."""
    from onnx import helper

    _merge_duplicates(g)
    producers, consumers = g.producers(), g.consumers()
    wanted: set[str] = set()
    for node in _integer_nodes(g):
        for t in _activation_inputs(g, producers, node):
            wanted.add(t)
        y = node.output[0]
        wanted.add(y)
        for c in consumers[y]:
            if c.op_type == "Relu":
                wanted.add(c.output[0])
    g.finish()  # a clean, sorted graph to run the calibration on
    ranges = _ranges(g.model, sorted(wanted), batches)
    for node in list(_integer_nodes(g)):
        producers, consumers = g.producers(), g.consumers()
        for t in _activation_inputs(g, producers, node):
            src = producers.get(t)
            if src is None and t not in {i.name for i in g.graph.input}:
                continue
            if src is not None and src.op_type == "DequantizeLinear":
                continue
            _qdq(g, t, ranges[t], report, helper)
        producers, consumers = g.producers(), g.consumers()
        y = node.output[0]
        users = consumers[y]
        signed = _input_signed(g, producers, node)
        if y in g.outputs or (
            len(users) == 1 and users[0].op_type == "QuantizeLinear" and _q_signed(g, users[0]) == signed
        ):
            continue  # the runtime fuses op → Q only when that Q is the op's single reader, of the input's type
        relus = [c for c in users if c.op_type == "Relu"]
        if len(relus) == 1 and all(c.op_type in ("Relu", "QuantizeLinear") for c in users):
            relu = relus[0]  # absorb: uint8 with zero point 0 is the Relu; everything reads the quantized value
            lo, hi = ranges.get(relu.output[0], (0.0, ranges[y][1]))
            dq_out = _qdq(g, y, (0.0, max(hi, 0.0)), report, helper, signed)
            g.replace_uses(relu.output[0], dq_out)
            g.nodes.remove(relu)
            continue
        _qdq(g, y, ranges[y], report, helper, signed)


def _q_signed(g: _Graph, q: Any) -> bool:
    """Whether a Q/DQ node's zero point (its type) is ``int8``."""
    zp = g.value(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    return zp is not None and zp.dtype == np.int8


def _input_signed(g: _Graph, producers: dict[str, Any], node: Any) -> bool:
    """A quantized weighted op reading ``int8`` activations must write ``int8`` too; everything else ``uint8``."""
    if node.op_type not in _WEIGHTED:
        return False
    src = producers.get(node.input[0])
    return src is not None and src.op_type == "DequantizeLinear" and _q_signed(g, src)


def _qdq(g: _Graph, t: str, rng: tuple[float, float], report: IntegerReport, helper: Any, signed: bool = False) -> str:
    """Insert ``t → Q → DQ`` and make every other reader of ``t`` read the DQ output; returns its name."""
    scale, zero_point = calibrated_scale(*rng, signed=signed)
    s_name = g.const(t + "_scale", np.array(scale, dtype=np.float32))
    z_name = g.const(t + "_zp", np.array(zero_point, dtype=np.int8 if signed else np.uint8))
    q_out, dq_out = g.name(t + "_q"), g.name(t + "_dq")
    q = helper.make_node("QuantizeLinear", [t, s_name, z_name], [q_out])
    dq = helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out])
    g.replace_uses(t, dq_out)
    producers = g.producers()
    src = producers.get(t)
    at = g.nodes.index(src) + 1 if src is not None else 0
    g.nodes[at:at] = [q, dq]
    if t in g.outputs:  # pragma: no cover - graph outputs are never quantized by this pass
        raise AssertionError(t)
    report.calibrated_edges += 1
    return dq_out


def _int32_biases(g: _Graph, report: IntegerReport) -> None:
    """Step 5: bias → DequantizeLinear(int32 codes, s_x·s_w) for quantized Conv/Gemm with a quantized input."""
    from onnx import helper

    producers = g.producers()
    for node in [n for n in g.nodes if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or not node.input[2] or node.input[2] not in g.inits:
            continue
        wdq = _int8_weight_dq(g, producers, node)
        xdq = producers.get(node.input[0])
        if wdq is None or xdq is None or xdq.op_type != "DequantizeLinear":
            continue
        sx, sw = g.value(xdq.input[1]), g.value(wdq.input[1])
        if sx is None or sw is None or sx.size != 1:
            continue
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0):
            continue
        bias = np.asarray(g.inits[node.input[2]], dtype=np.float64)
        s = (np.float64(sx.reshape(())) * np.asarray(sw, dtype=np.float64).reshape(-1)) * np.ones_like(bias)
        codes = np.clip(np.round(bias / s), -(2**31), 2**31 - 1).astype(np.int32)
        out = g.name(node.input[2] + "_dq")
        dq = helper.make_node(
            "DequantizeLinear",
            [g.const("bias_int32", codes), g.const("bias_scale", s.astype(np.float32)),
             g.const("bias_zp", np.zeros(codes.shape, dtype=np.int32))],
            [out],
            axis=0,
        )  # fmt: skip
        g.nodes.insert(g.nodes.index(node), dq)
        node.input[2] = out
        report.int32_biases += 1


# 7-bit range for the weights this pass quantizes itself: x86 U8S8 kernels without VNNI add pairs of uint8×int8
# products in int16 (VPMADDUBSW), which saturates when both codes are near full scale (255·127·2 > 32767); a
# max-scaled first layer reading a zero-point-shifted image hits that constantly (measured: −10 pt top-1 on
# cifar_resnet20). ±63 keeps every pair sum below 2^15 (onnxruntime's "reduce_range").
_FP_WEIGHT_MAX = 63.0


def _quantize_fp_layers(g: _Graph, report: IntegerReport) -> None:
    """Give the float ``Conv`` / ``Gemm`` layers (the model's FP first/last layers) int8 per-output-channel weights:
    symmetric, ``scale = max|w|/63`` per channel (7-bit range: see ``_FP_WEIGHT_MAX``)."""
    from onnx import helper

    for node in [n for n in g.nodes if n.op_type in ("Conv", "Gemm")]:
        w = g.value(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.dtype.kind != "f" or w.ndim < 2:
            continue
        if node.op_type == "Gemm" and (_attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0):
            continue
        flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64)).max(axis=1)
        scale = np.maximum(flat / _FP_WEIGHT_MAX, 1e-12).astype(np.float32)
        codes = np.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1)))
        codes = np.clip(codes, -_FP_WEIGHT_MAX, _FP_WEIGHT_MAX).astype(np.int8)
        out = g.name(node.input[1] + "_dq")
        dq = helper.make_node(
            "DequantizeLinear",
            [g.const(node.input[1] + "_int8", codes), g.const(node.input[1] + "_scale", scale),
             g.const(node.input[1] + "_zp", np.zeros(scale.shape, dtype=np.int8))],
            [out],
            axis=0,
        )  # fmt: skip
        g.nodes.insert(g.nodes.index(node), dq)
        node.input[1] = out
        report.fp_layers_quantized += 1


def integerize(
    model: onnx.ModelProto, calibration: Iterable[np.ndarray], *, edges: bool = True, fp_layers: str = "int8"
) -> tuple[onnx.ModelProto, IntegerReport]:
    """Rewrite an exact-mode QDQ graph for integer kernels (module docstring, steps 1–5); ``model`` is modified.

    Args:
        model: the graph :func:`~lightning_dbq.export.export_onnx` builds in ``exact`` mode.
        calibration: input batches (NCHW float32 arrays, already preprocessed) to calibrate the added 8-bit edges.
        edges: ``False`` stops after the value-preserving steps (1–3): for testing the rewrite itself.
        fp_layers: ``"int8"`` (default) also gives the model's FP first/last layers 8-bit per-channel weights and
            calibrated 8-bit inputs, so the whole network runs on integer kernels (on resnet18 the FP32 stem and its
            max-pool took a third of the integer model's time); ``"float"`` keeps them as trained.

    Returns:
        The same ``model`` object and an :class:`IntegerReport`.

    Raises:
        ValueError: ``calibration`` is empty.
    """
    if fp_layers not in FP_LAYERS:
        raise ValueError(f"export_onnx(): fp_layers must be one of {list(FP_LAYERS)}, got {fp_layers!r}")
    report = IntegerReport()
    g = _Graph(model)
    _inline_constants(g)
    _fold_weight_transposes(g)
    _fold_norms(g, report)
    _absorb_clamps(g, report)
    g.finish()
    if edges:
        if fp_layers == "int8":
            _quantize_fp_layers(g, report)
        _insert_edges(g, [np.asarray(x) for x in calibration], report)
        _int32_biases(g, report)
        g.finish()
    return model, report
