"""P7: serving latency, every figure a ratio to PyTorch FP32 eager on the same batch, measured in one run.

Variants (one intra-op thread everywhere; ``torch.inference_mode`` for PyTorch; ONNX Runtime CPU provider with all
graph optimizations): the switchable model at w4a4 (``set_bits``), ``freeze(model, 4)``, the frozen model under
``torch.compile`` (Inductor), ORT FP32 (the FP32 model exported to ONNX), our ONNX export in ``exact`` and
``integer`` mode at w8a8 and w4a4, and ORT's own static int8 quantization of the FP32 model (``quant_pre_process``
then ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations; the reference for what this CPU can do).
Models: resnet18 at 224 px (1000 classes) and cifar_resnet20 at 32 px, batch 1 and 32. Weights are random (speed
does not depend on them); activation scales come from one training-mode batch; both int8 exports calibrate on the
same 2 random batches. Medians of interleaved rounds.

Targets (resnet18, batch 32): frozen ≤ 1.1x FP32; our ``integer`` w4a4 ≤ 0.35x FP32 and ≤ 1.2x ORT's own int8.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lightning_dbq as dbq
import lightning_dbq.models  # noqa: F401  (registers cifar_resnet20)
from experiments.bench.common import BenchResult, interleaved_times, median, setup_torch

__all__ = ["measure", "run"]

MODELS = {"resnet18": (224, 1000), "cifar_resnet20": (32, 10)}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_fp32_and_int8(fp: torch.nn.Module, size: int, calib: list[torch.Tensor], tmp: Path) -> tuple[Path, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp_path, pre, q_path = tmp / "fp32.onnx", tmp / "fp32_pre.onnx", tmp / "ort_int8.onnx"
    torch.onnx.export(fp, (torch.randn(1, 3, size, size),), fp_path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    quant_pre_process(str(fp_path), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(pre), str(q_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return fp_path, q_path


def measure(name: str, batches: tuple[int, ...], *, warmup: int, repeats: int, compile_: bool) -> dict[str, Any]:
    """Ratios to FP32 eager for every variant of the module docstring, per batch size."""
    from lightning_dbq.quant.factory import create_fp_model

    size, classes = MODELS[name]
    setup_torch()
    fp = create_fp_model(name, num_classes=classes).eval()
    torch.manual_seed(0)
    model = dbq.create_model(name, bits=[8, 6, 4, 2], num_classes=classes)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(2)]
    model.train()
    with torch.no_grad():
        model(calib[0])
    model.eval()
    dbq.set_bits(model, 4)
    frozen = dbq.freeze(model, 4)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="p7_") as tmpdir:
        tmp = Path(tmpdir)
        fp_path, ort_int8 = _ort_fp32_and_int8(fp, size, calib, tmp)
        sessions = {"ort_fp32": _session(fp_path), "ort_own_int8": _session(ort_int8)}
        for bits in (8, 4):
            for mode in ("exact", "integer"):
                kw = {"calibration_data": calib} if mode == "integer" else {}
                p = dbq.export_onnx(model, bits, tmp / f"{mode}{bits}.onnx", calib[0][:1], mode=mode, **kw)
                sessions[f"onnx_{mode}_w{bits}a{bits}"] = _session(p)
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=g)
            xn = x.numpy()
            fns: dict[str, Callable[[], Any]] = {
                "fp32_eager": lambda x=x: fp(x),
                "switchable_w4a4": lambda x=x: model(x),
                "frozen_w4a4": lambda x=x: frozen(x),
            }
            if compile_:
                compiled = torch.compile(frozen, dynamic=False)
                with torch.inference_mode():
                    compiled(x)  # compile outside the timed rounds
                fns["frozen_compile_w4a4"] = lambda x=x, c=compiled: c(x)
            for key, sess in sessions.items():
                fns[key] = lambda s=sess, xn=xn: s.run(None, {"input": xn})
            with torch.inference_mode():
                times = interleaved_times(fns, warmup=warmup, repeats=repeats)
            base = median(times["fp32_eager"])
            out[f"batch{batch}"] = {
                "over_fp32": {k: median(v) / base for k, v in times.items()},
                "fp32_eager_median_s": base,
                "repeats": repeats,
            }
            r = out[f"batch{batch}"]["over_fp32"]
            r["integer_w4a4_over_ort_int8"] = r["onnx_integer_w4a4"] / r["ort_own_int8"]
    return out


def run(quick: bool) -> list[BenchResult]:
    """P7 results (the targets are on resnet18, batch 32; everything else is in ``details``)."""
    if quick:
        d = measure("cifar_resnet20", (8,), warmup=1, repeats=2, compile_=False)
        r = d["batch8"]["over_fp32"]
        return [BenchResult("P7_integer_cifar_resnet20", "ONNX integer w4a4 / FP32 eager (quick)",
                            r["onnx_integer_w4a4"], "<= 1.0", details=d)]  # fmt: skip
    details = {
        "resnet18": measure("resnet18", (1, 32), warmup=2, repeats=7, compile_=True),
        "cifar_resnet20": measure("cifar_resnet20", (1, 32), warmup=3, repeats=15, compile_=True),
    }
    r18 = details["resnet18"]["batch32"]["over_fp32"]
    c20 = details["cifar_resnet20"]["batch32"]["over_fp32"]
    return [
        BenchResult("P7_frozen_resnet18", "frozen w4a4 / FP32 eager, resnet18 224 px, batch 32",
                    r18["frozen_w4a4"], "<= 1.1", details=details),
        BenchResult("P7_frozen_cifar_resnet20", "frozen w4a4 / FP32 eager, cifar_resnet20 32 px, batch 32",
                    c20["frozen_w4a4"], "<= 1.1", details={"see": "P7_frozen_resnet18.details"}),
        BenchResult("P7_integer_resnet18", "ONNX integer w4a4 (ORT) / FP32 eager, resnet18, batch 32",
                    r18["onnx_integer_w4a4"], "<= 0.35", details={"see": "P7_frozen_resnet18.details"}),
        BenchResult("P7_integer_vs_ort_int8", "ONNX integer w4a4 / ORT's own static int8, resnet18, batch 32",
                    r18["integer_w4a4_over_ort_int8"], "<= 1.2", details={"see": "P7_frozen_resnet18.details"}),
    ]  # fmt: skip
