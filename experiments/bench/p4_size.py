"""P4: artifact bytes / FP32 state_dict bytes for resnet18 (num_classes=10), {8,6,4,2} and {4,3,2}.

Targets: <= 0.26 and <= 0.14. The numerator is the size on disk of the ``*.dbq.safetensors`` file written by
``save_int`` (header and JSON manifest included); the denominator is the sum of ``nbytes`` of the tensors in the
unprepared FP32 model's ``state_dict()`` (BatchNorm counters included). The breakdown of the artifact (integer codes,
FP first/last layers, per-bit norms, scales, header) is in ``details``.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch

import lightning_dbq as dbq
from experiments.bench.common import BenchResult, setup_torch

__all__ = ["run", "size_ratio"]

TARGETS = {(8, 6, 4, 2): "<= 0.26", (4, 3, 2): "<= 0.14"}


def _header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _breakdown(path: Path) -> dict[str, int]:
    """Bytes per category of the artifact's tensors, from the safetensors header."""
    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    out = {"codes": 0, "norms": 0, "scales": 0, "other_fp": 0, "header": 8 + n}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        size = meta["data_offsets"][1] - meta["data_offsets"][0]
        if key.startswith("__codes__."):
            out["codes"] += size
        elif ".norms." in key:
            out["norms"] += size
        elif key.endswith("scale") or ".scales." in key:
            out["scales"] += size
        else:
            out["other_fp"] += size
    return out


def size_ratio(bits: tuple[int, ...]) -> BenchResult:
    """Artifact / FP32 state_dict bytes for one bit list."""
    setup_torch()
    fp = timm.create_model("resnet18", num_classes=10)
    fp_bytes = sum(t.numel() * t.element_size() for t in fp.state_dict().values())
    model = dbq.prepare(fp, bits=list(bits)).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    with tempfile.TemporaryDirectory() as tmp:
        path = dbq.save_int(model, Path(tmp) / "r18.dbq.safetensors")
        art_bytes = path.stat().st_size
        parts = _breakdown(path)
    details: dict[str, Any] = {
        "model": "resnet18 (timm, num_classes=10)",
        "bits": list(bits),
        "artifact_bytes": art_bytes,
        "fp32_state_dict_bytes": fp_bytes,
        "artifact_breakdown_bytes": parts,
        "codes_only_ratio": parts["codes"] / fp_bytes,
    }
    details["note"] = (
        f"integer codes alone {parts['codes'] / fp_bytes:.4f}; per-bit norm copies +{parts['norms'] / fp_bytes:.4f}, "
        f"FP first/last layers +{parts['other_fp'] / fp_bytes:.4f}, header/manifest +{parts['header'] / fp_bytes:.4f}"
    )
    key = "P4_" + "".join(map(str, bits))
    title = f"P4 resnet18 artifact / FP32 state_dict bytes, {{{','.join(map(str, bits))}}}"
    return BenchResult(key, title, art_bytes / fp_bytes, TARGETS[bits], details=details)


def run(quick: bool = False) -> list[BenchResult]:
    """P4 for both bit lists (deterministic: no repeats needed)."""
    return [size_ratio(bits) for bits in TARGETS]


if __name__ == "__main__":
    for r in run():
        print(r.key, f"{r.value:.4f}", r.target, r.details["artifact_breakdown_bytes"])
