"""P3: switching a loaded resnet50 artifact to another bit-width / one batch-1 224 px forward (target <= 0.05).

``dbq.create_model("resnet50", num_classes=1000)`` (random init, activation scales initialised by one eval forward),
``save_int`` to a temporary file, ``load_int`` back (the served model). Then, interleaved: ``set_bits`` to the next
bit of a cycle 8 -> 4 -> 2 -> 6 -> ... (timed) and one ``inference_mode`` forward of a 1x3x224x224 image at that bit
(timed). Also timed: a per-layer (mixed) configuration switch, and ``load_int`` itself.
"""

from __future__ import annotations

import functools
import random
import tempfile
import time
from pathlib import Path

import torch

import lightning_dbq as dbq
from experiments.bench.common import BenchResult, median, setup_torch, timed

__all__ = ["run"]

TARGET = "<= 0.05"
CYCLE = (8, 4, 2, 6)


def run(quick: bool = False) -> list[BenchResult]:
    """P3 on resnet50."""
    setup_torch()
    repeats = 5 if quick else 20
    model = dbq.create_model("resnet50", num_classes=1000).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))  # initialise the activation scales
    with tempfile.TemporaryDirectory() as tmp:
        path = dbq.save_int(model, Path(tmp) / "r50.dbq.safetensors")
        t0 = time.perf_counter()
        served = dbq.load_int(path)
        load_s = time.perf_counter() - t0
    x = torch.randn(1, 3, 224, 224)
    layers = [i.name for i in dbq.quantized_layers(served)]
    rng = random.Random(0)
    mixed = [{n: rng.choice(CYCLE) for n in layers} for _ in range(len(CYCLE))]
    with torch.inference_mode():
        for _ in range(2):
            served(x)
        switch: list[float] = []
        forward: list[float] = []
        switch_mixed: list[float] = []
        for i in range(repeats):
            uniform, config = CYCLE[i % len(CYCLE)], mixed[i % len(mixed)]
            switch.append(timed(functools.partial(dbq.set_bits, served, uniform)))
            forward.append(timed(functools.partial(served, x)))
            switch_mixed.append(timed(functools.partial(dbq.set_bits, served, config)))
    ratio = median(switch) / median(forward)
    details = {
        "model": "resnet50 (timm, random init, num_classes=1000)",
        "quantized_layers": len(layers),
        "repeats": repeats,
        "set_bits_median_s": median(switch),
        "forward_b1_224_median_s": median(forward),
        "mixed_set_bits_median_s": median(switch_mixed),
        "mixed_over_forward": median(switch_mixed) / median(forward),
        "load_int_s": load_s,
        "switch_times_s": switch,
        "forward_times_s": forward,
    }
    return [
        BenchResult(
            "P3_switch", "P3 resnet50 artifact: set_bits / batch-1 224px forward", ratio, TARGET, details=details
        )
    ]


if __name__ == "__main__":
    for r in run():
        print(r.key, f"{r.value:.4f}", r.target, r.details["set_bits_median_s"], r.details["forward_b1_224_median_s"])
