"""ONNX export (``mode="exact"``): int8 QDQ graphs run in ONNX Runtime against ``freeze(model, cfg)``."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import lightning_dbq as dbq  # noqa: E402
import lightning_dbq.models  # noqa: E402, F401  (registers cifar_resnet20)
from lightning_dbq.export import export_onnx  # noqa: E402
from lightning_dbq.export.onnx import OnnxActQuant, _require_onnx  # noqa: E402
from lightning_dbq.quant.convert import WEIGHT_SCALE_ATTR, FrozenActQuant, freeze  # noqa: E402
from tests.helpers.ort import ort_session  # noqa: E402

INTEGER_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=[8, 6, 4, 2], num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 3, 32, 32))
    return model.eval()


_session = ort_session


def _tie_flip_fraction(frozen: nn.Module, x: torch.Tensor) -> tuple[float, int, int]:
    """Fraction (and count) of activation codes where the export module (half to even, ``x·(1/s)``) differs from
    FrozenActQuant (half up, ``x/s``) on the same activations, and the number of exact ties ``x/s = k + 1/2``."""
    counts = [0, 0, 0]

    def hook(mod: FrozenActQuant, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        other = OnnxActQuant(mod)(inp[0])
        counts[0] += int((other != out).sum())
        counts[1] += out.numel()
        v = torch.clamp(inp[0].float() / mod.scale, mod.lo, mod.hi)
        counts[2] += int((v - torch.floor(v) == 0.5).sum())

    handles = [m.register_forward_hook(hook) for m in frozen.modules() if isinstance(m, FrozenActQuant)]
    try:
        with torch.no_grad():
            frozen(x)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / max(counts[1], 1), counts[0], counts[2]


def _config(model: nn.Module, name: str) -> int | dict[str, int]:
    if name != "mixed":
        return int(name[1])
    rng = random.Random(0)
    layers = freeze(model, 8).dbq_frozen_config
    return {n: rng.choice([8, 6, 4, 2]) for n in layers}


@pytest.mark.parametrize("name", ["w8a8", "w4a4", "w2a2", "mixed"])
def test_exact_export_matches_frozen(resnet: nn.Module, name: str, tmp_path: Path, report) -> None:
    cfg = _config(resnet, name)
    path = export_onnx(resnet, cfg, tmp_path / "new" / "dir" / "model.onnx", torch.rand(2, 3, 32, 32))
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp file left behind

    frozen = freeze(resnet, cfg)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = Counter(n.op_type for n in proto.graph.node)

    # weights: one int8 initializer per quantized layer, read only by DequantizeLinear; no float copy
    quantized = [m for m in frozen.modules() if isinstance(getattr(m, WEIGHT_SCALE_ATTR, None), torch.Tensor)]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    int8 = {k for k, v in inits.items() if v.dtype == np.int8 and v.ndim >= 2}
    assert len(int8) == len(quantized)
    consumers = {k: [n.op_type for n in proto.graph.node if k in n.input] for k in int8}
    assert all(ops_ == ["DequantizeLinear"] for ops_ in consumers.values())
    floats = [v for v in inits.values() if v.dtype.kind == "f"] + [
        onnx.numpy_helper.to_array(a.t)
        for n in proto.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    for m in quantized:
        w = m.weight.detach().numpy()
        assert not any(f.shape == w.shape and np.allclose(f, w) for f in floats)
    n_act = sum(isinstance(m, FrozenActQuant) for m in frozen.modules())
    # two quantizers of the same tensor with the same scale and bits (a block's conv1 and its shortcut conv, both
    # initialised from the same batch) export as one Q/DQ pair (the exporter's common-subexpression elimination)
    assert 0 < ops["QuantizeLinear"] <= n_act
    assert ops["DequantizeLinear"] == ops["QuantizeLinear"] + len(quantized)

    opt = tmp_path / "opt.onnx"
    sess = _session(path, opt)
    integer_convs = sum(n.op_type in INTEGER_OPS for n in onnx.load(str(opt)).graph.node)
    float_convs = sum(n.op_type == "Conv" for n in onnx.load(str(opt)).graph.node)

    torch.manual_seed(1)
    x = torch.cat([torch.rand(192, 3, 32, 32), torch.randn(64, 3, 32, 32)])
    with torch.no_grad():
        ref = frozen(x)
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
    max_diff = float((ref - got).abs().max())
    flip, n_flip, n_ties = _tie_flip_fraction(frozen, x)
    report(
        f"onnx exact {name}: top-1 agreement {agree:.4f}, max |dlogit| {max_diff:.3g}, "
        f"half-even vs half-up codes differ {flip:.2e} ({n_flip}; exact ties {n_ties}), act quantizers {n_act}, "
        f"Q/DQ {ops['QuantizeLinear']}/{ops['DequantizeLinear']}, int8 weights {len(int8)}, "
        f"ORT integer convs {integer_convs} (float Conv {float_convs})"
    )
    assert agree >= 0.99


def test_per_channel_export(tmp_path: Path, report) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    model = dbq.prepare(net, [8, 4, 2], per_channel=True, quantize_first=True, quantize_last=True)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 16, 16))
    model.eval()
    path = export_onnx(model, 4, tmp_path / "pc.onnx", torch.randn(1, 3, 16, 16))
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == 3
    per_channel_dq = [
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and any(n.input[0] == t.name for t in int8)
        and n.input[1] in inits
        and onnx.numpy_helper.to_array(inits[n.input[1]]).size > 1
    ]
    assert len(per_channel_dq) == 3  # one scale per output channel
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = freeze(model, 4)(x)
    got = torch.from_numpy(_session(path).run(None, {"input": x.numpy()})[0])
    report(f"onnx exact per-channel w4a4 (toy): max |dlogit| {float((ref - got).abs().max()):.3g}")
    assert float((ref.argmax(1) == got.argmax(1)).float().mean()) >= 0.95


def test_bad_mode(resnet: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exact"):
        export_onnx(resnet, 8, tmp_path / "m.onnx", torch.rand(1, 3, 32, 32), mode="fast")
    assert not (tmp_path / "m.onnx").exists()


def test_uninitialised_model_raises(tmp_path: Path) -> None:
    model = dbq.create_model("cifar_resnet20", bits=[8, 4], num_classes=10)
    with pytest.raises(ValueError, match="never saw a batch"):
        export_onnx(model, 8, tmp_path / "m.onnx", torch.rand(1, 3, 32, 32))
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="onnx extra"):
        _require_onnx()


def test_package_import_is_lazy() -> None:
    code = (
        "import sys, lightning_dbq.export as e; assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules;"
        "from lightning_dbq.export import export_onnx; assert 'onnxruntime' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
