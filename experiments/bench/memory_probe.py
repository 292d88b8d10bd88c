"""Peak extra memory of one training step, measured in a fresh process (P8 and the FQT study use it).

    python -m experiments.bench.memory_probe '{"model": "cifar_resnet20", "bits": [8, 6, 4, 2], "active_bits": 4}'

Spec keys (all optional but ``model``): ``fp32`` (true: the unquantized model), ``bits``, ``active_bits``,
``weight_mode``, ``skip``, ``kernel`` (``prepare`` options), ``grad`` (``enable_grad_quant`` settings, null: exact),
``brevitas`` (true: the Brevitas reference at ``active_bits`` instead, :mod:`experiments.bench.brevitas_reference`),
``batch_size`` (128), ``image_size`` (32), ``num_classes`` (10), ``device`` (``cpu`` | ``cuda``).

``warm_step`` (true: a two-image forward and backward before the steps, so that one-off costs of a first backward are
outside them).

Prints one JSON line (MiB). CPU: the resident set before the first step (model, Adam, batch built, activation scales
initialised) and the peak (``ru_maxrss``, reset to the current RSS just before the steps: ``peak_reset``) over three
steps; ``extra_mib`` is their difference: what the step itself
needs (activations saved for backward, gradients, optimizer state, temporaries). CUDA: ``max_memory_allocated`` over
the three steps minus ``memory_allocated`` before them. Random weights: memory does not depend on their values.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments.bench.common import run_module

__all__ = ["FIXED_MMAP", "build", "measure", "run_probe"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux ``/proc/self/clear_refs``, value 5), so that
    ``ru_maxrss`` afterwards is the peak of what follows, not of model building, compilation or anything earlier;
    ``False`` where the kernel does not allow it (the peak is then the process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def build(spec: dict[str, Any]) -> nn.Module:
    """The model a spec describes (prepared, bits set, gradient quantization enabled as asked)."""
    import lightning_dbq as dbq
    from lightning_dbq.fqt import enable_grad_quant
    from lightning_dbq.quant.factory import create_fp_model

    net = create_fp_model(spec["model"], num_classes=spec.get("num_classes", 10))
    if spec.get("fp32"):
        return net
    if spec.get("brevitas"):  # the Brevitas reference at active_bits (experiments.bench.brevitas_reference)
        from experiments.bench.brevitas_reference import brevitas_quantize_model
        from lightning_dbq.quant.prepare import first_last_layers

        first, last = first_last_layers(net)
        return brevitas_quantize_model(net, spec.get("active_bits", 4), first | last)
    bits = spec.get("bits", [8, 6, 4, 2])
    options = {k: spec[k] for k in ("weight_mode", "skip", "kernel") if k in spec}
    net = dbq.prepare(net, bits=bits, **options)
    dbq.set_bits(net, spec.get("active_bits", bits[-1]))
    if spec.get("grad") is not None:
        enable_grad_quant(net, spec["grad"])
    return net


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Three training steps of :func:`build` ``(spec)``; the memory figures in MiB."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    net = build(spec).to(device).train()
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    n, size = spec.get("batch_size", 128), spec.get("image_size", 32)
    x = torch.randn(n, 3, size, size, device=device)
    y = torch.randint(0, spec.get("num_classes", 10), (n,), device=device)
    with torch.no_grad():
        net(x[:2])  # first-batch scale initialisation (and the compiled inference graphs) outside the steps
    if spec.get("warm_step"):  # also the one-off costs of a first backward (compiled training graphs, oneDNN's
        F.cross_entropy(net(x[:2]), y[:2]).backward()  # backward primitives, ...): two images, no optimizer step
        opt.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    peak_reset = True
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
        peak_reset = _reset_peak_rss()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"before_mib": round(before, 1), "peak_mib": round(peak, 1), "extra_mib": round(peak - before, 1),
            "device": str(device), "peak_reset": peak_reset}  # fmt: skip


#: glibc setting for CPU memory probes: a fixed mmap threshold (128 KiB), so every block of 128 KiB or more (all
#: activations and gradients) is mapped on allocation and unmapped when freed, and the peak RSS follows the live
#: tensors. glibc's default raises the threshold up to 32 MiB after the first frees, after which freed tensors stay
#: in the heap wherever they landed: the same FP32 step measured 259-335 MiB in fresh processes, with it 207.0-207.4.
FIXED_MMAP = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}


def run_probe(spec: dict[str, Any], timeout: float = 900, env: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (peak RSS is per process; ``env``: extra environment variables, such
    as :data:`FIXED_MMAP`); raises with its stderr on failure."""
    return run_module("experiments.bench.memory_probe", spec, timeout, env)


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
