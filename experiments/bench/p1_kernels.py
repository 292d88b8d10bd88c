"""P1 follow-up (no target): the bit-pass step with other fake-quant kernels, to size the proposed optimisations.

Same step and models as :mod:`experiments.bench.p1_step` (fp32 / dbq / hand-written LSQ), plus the DBQ model with
its quantizers routed (by patching ``lightning_dbq.quant.quantizers`` in this process only; no library file is
changed) to:

* ``dbq_fused``: :mod:`experiments.bench.fused_fakequant`'s one-``autograd.Function`` kernels (eager);
* ``dbq_compiled``: the library's own ``lsq_fake`` / ``double_round_fake`` wrapped in
  ``torch.compile(dynamic=True)`` (Inductor C++ kernels; the model itself stays eager).

Before timing, both candidates are checked against the library on one step (same loss, gradients equal to float
rounding), and the compile warm-up time is recorded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dbq as dbq
from experiments.bench.common import interleaved_times, median, setup_torch
from experiments.bench.fused_fakequant import compiled, fused_double_round_fake, fused_lsq_fake, patched
from experiments.bench.p1_step import BITS, step_fn, variants
from lightning_dbq.quant.factory import create_fp_model
from lightning_dbq.quant.functional import double_round_fake, lsq_fake

__all__ = ["run"]

Kernels = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


def _with(kernels: Kernels, fn: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        with patched(*kernels):
            fn()

    return call


def _max_grad_diff(model: nn.Module, kernels: Kernels, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative gradient difference (per tensor) between library kernels and ``kernels`` on one batch."""
    grads = []
    for k in (None, kernels):
        m = copy.deepcopy(model)
        if k is None:
            F.cross_entropy(m(x), y).backward()
        else:
            with patched(*k):
                F.cross_entropy(m(x), y).backward()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in zip(*grads, strict=True))


def bench_model(name: str, model: nn.Module, batch: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Interleaved step times of the five variants of ``model``."""
    setup_torch()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    models = variants(model)
    models["dbq"](x)  # initialise activation scales before copying
    fused: Kernels = (fused_lsq_fake, fused_double_round_fake)
    comp: Kernels = compiled()
    check = {"fused": _max_grad_diff(models["dbq"], fused, x, y)}
    dbq_fused, dbq_comp = copy.deepcopy(models["dbq"]), copy.deepcopy(models["dbq"])
    steps = {k: step_fn(m, x, y) for k, m in models.items()}
    steps["dbq_fused"] = _with(fused, step_fn(dbq_fused, x, y))
    steps["dbq_compiled"] = _with(comp, step_fn(dbq_comp, x, y))
    t0 = time.perf_counter()
    for b in (8, 6, 4, 2):  # compile every bit the per-bit loop would use
        dbq.set_bits(dbq_comp, b)
        steps["dbq_compiled"]()
    compile_s = time.perf_counter() - t0
    dbq.set_bits(dbq_comp, BITS)
    check["compiled"] = _max_grad_diff(models["dbq"], comp, x, y)
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
        "max_rel_grad_diff_vs_library": check,
    }


def kernel_micro(repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds of one forward+backward of each kernel alone: an activation (128x16x32x32, 4-bit unsigned, the
    input of a cifar_resnet20 stage-1 conv) and a weight (512x512x3x3, 8 -> 4 bits, a resnet18 layer4 conv)."""
    setup_torch()
    act = torch.randn(128, 16, 32, 32).relu_()
    weight = torch.randn(512, 512, 3, 3) * 0.02
    comp = compiled()
    kernels: dict[str, Kernels] = {
        "library": (lsq_fake, double_round_fake),
        "fused": (fused_lsq_fake, fused_double_round_fake),
        "compiled": comp,
    }
    out: dict[str, dict[str, float]] = {}
    for tensor_name, x, call in (
        ("activation_128x16x32x32", act, lambda k, x, s: k[0](x, s, 4, False, 1e-3)),
        ("weight_512x512x3x3", weight, lambda k, x, s: k[1](x, s, 8, 4, 1e-3)),
    ):
        fns = {}
        for name, k in kernels.items():
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
        print(k, {n: round(r, 3) for n, r in v["over_fp32"].items()}, v["max_rel_grad_diff_vs_library"])
