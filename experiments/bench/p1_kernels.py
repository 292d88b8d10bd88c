"""P1 follow-up (no target): the bit-pass step with each fake-quant back-end of the library, same run.

Same step and models as :mod:`experiments.bench.p1_step` (fp32 / hand-written LSQ), plus the DBQ model switched with
:func:`lightning_dbq.set_kernel` to each back-end of :mod:`lightning_dbq.quant.kernels`:

* ``dbq_eager``: the composite reference functions (``lsq_fake`` / ``double_round_fake``);
* ``dbq_fused``: one ``torch.autograd.Function`` per quantizer (the default);
* ``dbq_compile``: the composite functions under ``torch.compile(dynamic=True)`` (Inductor C++ kernels; the model
  itself stays eager).

Before timing, the fused and compiled models are checked against the eager one on one step (gradients equal to
float rounding), and the compile warm-up time is recorded.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dbq as dbq
from experiments.bench.common import interleaved_times, median, setup_torch
from experiments.bench.p1_step import BITS, step_fn, variants
from lightning_dbq.quant.factory import create_fp_model
from lightning_dbq.quant.kernels import KERNELS, kernels

__all__ = ["run"]


def _max_grad_diff(reference: nn.Module, other: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative gradient difference (per tensor) between two copies of a model on one batch."""
    grads = []
    for m in (copy.deepcopy(reference), copy.deepcopy(other)):
        F.cross_entropy(m(x), y).backward()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(*grads, strict=True))


def bench_model(name: str, model: nn.Module, batch: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Interleaved step times of fp32, the LSQ reference and the DBQ model on every back-end."""
    setup_torch()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    base = variants(model, kernel="eager")
    eager = base.pop("dbq")
    eager(x)  # initialise activation scales before copying
    models: dict[str, nn.Module] = {**base, "dbq_eager": eager}
    for kernel in KERNELS:
        if kernel != "eager":
            models[f"dbq_{kernel}"] = dbq.set_kernel(copy.deepcopy(eager), kernel)
    steps = {k: step_fn(m, x, y) for k, m in models.items()}
    t0 = time.perf_counter()
    for b in (8, 6, 4, 2):  # compile every bit the per-bit loop would use
        dbq.set_bits(models["dbq_compile"], b)
        steps["dbq_compile"]()
    compile_s = time.perf_counter() - t0
    dbq.set_bits(models["dbq_compile"], BITS)
    check = {k: _max_grad_diff(eager, models[f"dbq_{k}"], x, y) for k in KERNELS if k != "eager"}
    times = interleaved_times(steps, warmup=warmup, repeats=repeats)
    med = {k: median(v) for k, v in times.items()}
    rounds = {k: median([a / b for a, b in zip(v, times["fp32"], strict=True)]) for k, v in times.items()}
    return {
        "model": name,
        "batch": batch,
        "repeats": repeats,
        "median_s": med,
        "over_fp32": rounds,
        "over_fp32_note": "median over interleaved rounds of (variant step / fp32 step)",
        "compile_warmup_s_4_bits": compile_s,
        "max_rel_grad_diff_vs_eager": check,
    }


def kernel_micro(repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds of one forward+backward of each kernel alone: an activation (128x16x32x32, 4-bit unsigned, the
    input of a cifar_resnet20 stage-1 conv) and a weight (512x512x3x3, 8 -> 4 bits, a resnet18 layer4 conv)."""
    setup_torch()
    act = torch.randn(128, 16, 32, 32).relu_()
    weight = torch.randn(512, 512, 3, 3) * 0.02
    backends = {name: kernels(name) for name in KERNELS}
    out: dict[str, dict[str, float]] = {}
    for tensor_name, x, call in (
        ("activation_128x16x32x32", act, lambda k, x, s: k.lsq(x, s, 4, False, 1e-3)),
        ("weight_512x512x3x3", weight, lambda k, x, s: k.double_round(x, s, 8, 4, 1e-3)),
    ):
        fns = {}
        for name, k in backends.items():
            xx, ss = x.clone().requires_grad_(), torch.tensor(0.05 if x is act else 0.002, requires_grad=True)
            fns[name] = lambda k=k, xx=xx, ss=ss, call=call: call(k, xx, ss).backward(torch.ones_like(xx))
        times = interleaved_times(fns, warmup=2, repeats=repeats)
        out[tensor_name] = {name: 1e3 * median(t) for name, t in times.items()}
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Kernel variants for cifar_resnet20 (and resnet18 unless ``quick``), plus the kernels alone."""
    setup_torch()
    r20 = create_fp_model("cifar_resnet20", num_classes=10)
    if quick:
        return {
            "kernels_ms": kernel_micro(3),
            "cifar_resnet20": bench_model("cifar_resnet20", r20, batch=64, warmup=1, repeats=3),
        }
    r18 = timm.create_model("resnet18", num_classes=10)
    return {
        "kernels_ms": kernel_micro(15),
        "cifar_resnet20": bench_model("cifar_resnet20", r20, batch=128, warmup=2, repeats=11),
        "resnet18": bench_model("resnet18", r18, batch=128, warmup=2, repeats=11),
    }


if __name__ == "__main__":
    for k, v in run().items():
        if "over_fp32" in v:
            print(k, {n: round(r, 3) for n, r in v["over_fp32"].items()}, v["max_rel_grad_diff_vs_eager"])
        else:
            print(k, v)
