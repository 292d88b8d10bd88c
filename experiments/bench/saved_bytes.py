"""Bytes autograd keeps for the backward of one training-mode forward (exact, unlike peak RSS; docs/memory.md).

    python -m experiments.bench.saved_bytes '{"model": "cifar_resnet20", "bits": [8, 6, 4, 2], "active_bits": 4}'

Same spec as :mod:`experiments.bench.memory_probe` (``model``, ``fp32``, ``bits``, ``active_bits``, ``kernel``, ...,
``batch_size`` 128, ``image_size`` 32). Every tensor saved for backward passes a ``saved_tensors_hooks`` pack hook;
the figure is the total size of the distinct storages among them, parameters left out (they exist without the
step). Prints one JSON line (MiB, per dtype).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.bench.memory_probe import build

__all__ = ["saved_bytes"]


def saved_bytes(spec: dict[str, Any]) -> dict[str, Any]:
    """MiB of distinct non-parameter storages saved for backward by one forward of :func:`build` ``(spec)``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build(spec).train()
    n, size = spec.get("batch_size", 128), spec.get("image_size", 32)
    x = torch.randn(n, 3, size, size)
    y = torch.randint(0, spec.get("num_classes", 10), (n,))
    with torch.no_grad():
        net(x[:2])  # first-batch scale initialisation, as the memory probe does
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype).removeprefix("torch.")))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), y)
    by_dtype: Counter[str] = Counter()
    for ptr, (nbytes, dtype) in seen.items():
        if ptr not in params:
            by_dtype[dtype] += nbytes
    del loss
    return {"saved_mib": round(sum(by_dtype.values()) / 2**20, 1),
            "by_dtype_mib": {k: round(v / 2**20, 1) for k, v in sorted(by_dtype.items())}}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(saved_bytes(json.loads(sys.argv[1]))))
