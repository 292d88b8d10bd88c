"""Per-bit metric collections (one torchmetrics collection per bit: a shared one would mix bits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_dbq.training.state import bit_label

__all__ = ["PerBitMetrics"]


class PerBitMetrics(nn.Module):
    """``{label: MetricCollection(acc)}`` for every bit, with epoch summaries ``acc_min`` / ``acc_mean``.

    Args:
        bits: candidate bits.
        num_classes: classes of the task.
        extra_labels: further configuration labels (e.g. searched SubNets) to track.
    """

    def __init__(self, bits: Sequence[int], num_classes: int, extra_labels: Sequence[str] = ()) -> None:
        super().__init__()
        labels = [bit_label(b) for b in bits] + list(extra_labels)
        self.collections = nn.ModuleDict(
            {label: MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")})
             for label in labels}
        )  # fmt: skip

    def update(self, label: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch for configuration ``label``."""
        coll: Any = self.collections[label]
        coll.update(logits, target)

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix/acc_w8a8, ..., prefix/acc_min, prefix/acc_mean}`` (min/mean over uniform-bit labels only)."""
        out: dict[str, torch.Tensor] = {}
        uniform = []
        coll: Any
        for label, coll in self.collections.items():
            if not coll["acc"].update_called:
                continue
            value = coll.compute()["acc"]
            out[f"{prefix}/acc_{label}"] = value
            if label.startswith("w") and "a" in label and label[1:].split("a")[0].isdigit():
                uniform.append(value)
        if uniform:
            stacked = torch.stack(uniform)
            out[f"{prefix}/acc_min"] = stacked.min()
            out[f"{prefix}/acc_mean"] = stacked.mean()
        return out

    def reset(self) -> None:
        """Reset every collection."""
        coll: Any
        for coll in self.collections.values():
            coll.reset()
