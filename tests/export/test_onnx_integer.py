"""ONNX export, ``mode="integer"``: every quantized convolution runs as an integer kernel in ONNX Runtime.

The rewrite (lightning_dbq/export/integer.py) has value-preserving steps (norm folding, clamps moved onto the codes,
merged duplicates) checked against the exact graph, and one approximation (calibrated 8-bit edges), checked against
the NumPy definition of its scale and measured against the frozen PyTorch model.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import lightning_dbq as dbq  # noqa: E402
import lightning_dbq.models  # noqa: E402, F401  (registers cifar_resnet20)
from lightning_dbq.export import export_onnx  # noqa: E402
from lightning_dbq.export.integer import calibrated_scale, integerize  # noqa: E402
from lightning_dbq.quant.convert import WEIGHT_SCALE_ATTR, freeze  # noqa: E402
from tests.helpers.ort import ort_session  # noqa: E402

INTEGER_CONV = {"QLinearConv", "ConvInteger"}
FLOAT_CONV = {"Conv", "FusedConv"}  # FusedConv: ORT's float Conv+activation; nchwc Conv keeps op_type "Conv"


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=[8, 6, 4, 2], num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 3, 32, 32))
    return model.eval()


_session = ort_session


def _op_counts(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(32, 3, 32, 32, generator=g) for _ in range(2)]


def _mixed(model: nn.Module) -> dict[str, int]:
    rng = random.Random(1)
    return {n: rng.choice([8, 6, 4, 2]) for n in freeze(model, 8).dbq_frozen_config}


@pytest.mark.parametrize("name", ["w8a8", "w4a4", "w2a2", "mixed"])
def test_every_quantized_conv_is_an_integer_kernel(resnet: nn.Module, name: str, tmp_path: Path, report) -> None:
    cfg = _mixed(resnet) if name == "mixed" else int(name[1])
    frozen = freeze(resnet, cfg)
    quantized = [m for m in frozen.modules() if isinstance(getattr(m, WEIGHT_SCALE_ATTR, None), torch.Tensor)]
    n_conv = sum(isinstance(m, nn.Conv2d) for m in frozen.modules())
    n_qconv = sum(isinstance(m, nn.Conv2d) for m in quantized)
    assert n_qconv == 20 and n_conv == 21  # the stem stays FP32

    x = torch.rand(2, 3, 32, 32)
    counts = {}
    for mode, kw in (
        ("exact", {}),
        ("integer", {"calibration_data": _calibration()}),
        ("integer_fp_float", {"calibration_data": _calibration(), "fp_layers": "float"}),
    ):
        path = export_onnx(resnet, cfg, tmp_path / f"{mode}.onnx", x, mode=mode.removesuffix("_fp_float"), **kw)
        _session(path, tmp_path / f"{mode}_opt.onnx")
        counts[mode] = _op_counts(tmp_path / f"{mode}_opt.onnx")
    exact, integer, fp_float = counts["exact"], counts["integer"], counts["integer_fp_float"]
    exact_convs = {k: exact[k] for k in sorted(exact) if "Conv" in k}
    report(
        f"ORT optimized cifar_resnet20 {name}: exact: integer convs "
        f"{sum(exact[k] for k in INTEGER_CONV)}/{n_qconv} ({exact_convs}); "
        f"integer: {sum(integer[k] for k in INTEGER_CONV)}/{n_conv} "
        f"({dict((k, integer[k]) for k in sorted(integer) if 'Conv' in k or 'QLinear' in k or 'QGemm' in k)}); "
        f"integer fp_layers=float: {sum(fp_float[k] for k in INTEGER_CONV)}/{n_conv}"
    )
    # fp_layers="float": every quantized conv is an integer kernel, only the FP32 stem stays float
    assert fp_float["QLinearConv"] == n_qconv
    assert sum(fp_float[k] for k in FLOAT_CONV) == n_conv - n_qconv
    # default (fp_layers="int8"): the stem too, and the FP classifier becomes an integer Gemm
    assert integer["QLinearConv"] == n_conv and sum(integer[k] for k in FLOAT_CONV) == 0
    assert integer["QGemm"] == 1 and integer["Gemm"] == 0
    for ops in (integer, fp_float):
        assert ops["QLinearAdd"] == 9 and ops["QLinearGlobalAveragePool"] == 1  # residual adds and pooling too
        assert ops["Add"] == 0
    assert sum(exact[k] for k in INTEGER_CONV) < n_qconv  # the exact graph does not get there


@pytest.mark.parametrize("bits", [8, 2])
def test_value_preserving_steps_match_the_exact_graph(resnet: nn.Module, bits: int, tmp_path: Path) -> None:
    """Norm folding + clamps moved onto the codes + merged nodes: the same function up to float rounding (both
    graphs run unoptimized, so no kernel choice differs)."""
    x = torch.rand(2, 3, 32, 32)
    path = export_onnx(resnet, bits, tmp_path / "exact.onnx", x)
    proto = onnx.load(str(path))
    _, rep = integerize(proto, [], edges=False)
    assert rep.folded_norms == 20 and rep.calibrated_edges == 0
    torch.manual_seed(2)
    xs = torch.rand(128, 3, 32, 32).numpy()
    ref = _session(path, level="none").run(None, {"input": xs})[0]
    got = _session(proto.SerializeToString(), level="none").run(None, {"input": xs})[0]
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] == 0  # all folded
    readers = {n.output[0]: [c.op_type for c in proto.graph.node if n.output[0] in c.input] for n in proto.graph.node}
    relus = [n for n in proto.graph.node if n.op_type == "Relu"]
    assert 0 < len(relus) < 19  # absorbed into the quantizers, kept only for the shortcuts and the pooling
    assert all(any(op != "QuantizeLinear" for op in readers[r.output[0]]) for r in relus)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    err = np.abs(ref - got).max() / np.abs(ref).max()
    assert agree >= 0.98, agree  # a code can move by one step where folding changed the last float bit
    assert err < 0.05, err


def test_norm_folding_with_negative_gamma_saturates_only_minus_128(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        net[3].weight.copy_(torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.7, 1.0, -1.0]))
        net[3].running_mean.uniform_(-0.2, 0.2)
        net[3].running_var.uniform_(0.5, 2.0)
    model = dbq.prepare(net, [8, 4])
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 12, 12))
    model.eval()
    frozen = freeze(model, 8)
    conv = frozen[2].layer
    codes = torch.round(conv.weight / getattr(conv, WEIGHT_SCALE_ATTR)).to(torch.int64)
    negative = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.7, 1.0, -1.0]) < 0
    expected = int((codes[negative] == -128).sum())  # independent count: −(−128) does not fit int8
    path = export_onnx(model, 8, tmp_path / "m.onnx", torch.randn(1, 3, 12, 12))
    proto = onnx.load(str(path))
    _, rep = integerize(proto, [], edges=False)
    assert rep.folded_norms == 1 and rep.saturated_codes == expected
    x = torch.randn(64, 3, 12, 12)
    with torch.no_grad():
        ref = frozen(x).numpy()
    got = _session(proto.SerializeToString(), level="none").run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-50, 50, allow_nan=False),
    width=st.floats(1e-3, 100, allow_nan=False),
    signed=st.booleans(),
)
def test_calibrated_scale_covers_the_range_and_keeps_zero_exact(lo: float, width: float, signed: bool) -> None:
    hi = lo + width
    scale, zp = calibrated_scale(lo, hi, signed=signed)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    assert qmin <= zp <= qmax
    xs = np.linspace(min(lo, 0.0), max(hi, 0.0), 257, dtype=np.float64)
    q = np.clip(np.round(xs / scale) + zp, qmin, qmax)  # ONNX QuantizeLinear (half to even), NumPy reference
    back = (q - zp) * scale
    assert np.abs(back - xs).max() <= 0.5 * scale * (1 + 1e-6) + 1e-12  # no value of the range is clipped
    assert (np.clip(np.round(0.0 / scale) + zp, qmin, qmax) - zp) * scale == 0.0  # 0 (padding, ReLU) is exact


def test_integer_mode_needs_calibration_data(resnet: nn.Module, tmp_path: Path) -> None:
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="calibration_data"):
        export_onnx(resnet, 8, tmp_path / "m.onnx", x, mode="integer")
    with pytest.raises(ValueError, match="empty"):
        export_onnx(resnet, 8, tmp_path / "m.onnx", x, mode="integer", calibration_data=[])
    with pytest.raises(ValueError, match="only used by mode='integer'"):
        export_onnx(resnet, 8, tmp_path / "m.onnx", x, calibration_data=[x])
    with pytest.raises(ValueError, match="fp_layers must be one of"):
        export_onnx(resnet, 8, tmp_path / "m.onnx", x, mode="integer", calibration_data=[x], fp_layers="fp16")
    assert not (tmp_path / "m.onnx").exists()


def test_integer_mode_tracks_the_frozen_model(resnet: nn.Module, tmp_path: Path, report) -> None:
    """The 8-bit edges are an approximation: measured here on random weights (real-data figures: docs/serving.md)."""
    torch.manual_seed(5)
    x = torch.rand(256, 3, 32, 32)
    for bits in (8, 4):
        with torch.no_grad():
            ref = freeze(resnet, bits)(x)
        path = export_onnx(resnet, bits, tmp_path / f"i{bits}.onnx", x[:1], mode="integer",
                           calibration_data=_calibration())  # fmt: skip
        got = torch.from_numpy(_session(path).run(None, {"input": x.numpy()})[0])
        rel = float((got - ref).abs().max() / ref.abs().max())
        agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
        report(
            f"onnx integer w{bits}a{bits} (random weights): top-1 agreement {agree:.4f}, "
            f"max |dlogit|/max|logit| {rel:.3f}"
        )
        assert rel < 0.25 and agree >= 0.8
