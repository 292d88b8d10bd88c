"""Peak extra memory of one training step (a fresh process per measurement, CPU, peak RSS).

    python -m experiments.fqt.memory '{"model": "cifar_resnet20", "grad": {"method": "agp", "bits": 4,
        "keep": 0.25}, "optimizer": "adam", "batch_size": 128, "skip": []}'

Prints one JSON line: the resident set before the first step (model, optimizer, batch built; MiB), the peak over
three training steps (``ru_maxrss``) and their difference, the step's extra memory. ``grad: null`` is 1-bit QAT
(exact gradients); ``"fp32": true`` an unquantized model. Random weights: memory does not depend on their values.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import torch
import torch.nn.functional as F


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model of ``spec``, run three steps, return the memory figures (MiB)."""
    from lightning_dbq.quant.factory import create_fp_model
    from lightning_dbq.training.module import DBQModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if spec.get("fp32"):
        net = create_fp_model(spec["model"], num_classes=5)
    else:
        net = DBQModule(spec["model"], num_classes=5, bits=[1], alrs="off", grad_quant=spec.get("grad"),
                        quant={"weight_mode": "binary", "skip": spec.get("skip", [])}).model  # fmt: skip
    net.train()
    params = list(net.parameters())
    opt = torch.optim.Adam(params, 1e-3) if spec.get("optimizer", "adam") == "adam" else torch.optim.SGD(params, 1e-2)
    x = torch.randn(spec["batch_size"], 3, 32, 32)
    y = torch.randint(0, 5, (spec["batch_size"],))
    with torch.no_grad():
        net(x[:2])  # first-batch scale initialisation outside the measured steps
    before = _rss_mib()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_before_mib": round(before, 1), "peak_mib": round(peak, 1), "extra_mib": round(peak - before, 1)}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
