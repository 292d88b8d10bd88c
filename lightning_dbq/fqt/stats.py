"""What a quantized backward keeps: the fraction of gradient groups kept and the average bits per element.

>>> with record_grad_stats() as stats:  # doctest: +SKIP
...     loss.backward()
>>> stats.kept_fraction("x"), stats.average_bits()  # doctest: +SKIP

Only groups with a non-zero exact gradient count (an all-zero group carries nothing for any method). A group is
*kept* when its estimate is not all zero: every group for ``ptq``/``psq``/``bhq``, about ``keep`` of them for ``agp``
and ``topk``. Average bits = ``bits`` × (elements of kept groups / elements of non-zero groups), the scales and
zero points of each group not counted. Recording costs two reductions per estimate and only runs inside
:func:`record_grad_stats`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["GradStats", "record_estimate", "record_grad_stats"]

#: the two paths of a layer's backward: ``"x"`` (per-sample copy, input gradient) and ``"w"`` (weight gradient)
PATHS = ("x", "w")


@dataclass
class GradStats:
    """Counts accumulated over every quantized estimate made while recording, per path (``"x"`` / ``"w"``)."""

    groups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    elements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    bit_elements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))

    def kept_fraction(self, path: str | None = None) -> float:
        """Kept non-zero groups / non-zero groups on ``path`` (``None``: both); NaN before any estimate."""
        paths = PATHS if path is None else (path,)
        total = sum(self.groups[p] for p in paths)
        return sum(self.kept[p] for p in paths) / total if total else float("nan")

    def average_bits(self, path: str | None = None) -> float:
        """Gradient bits per element of the non-zero groups on ``path`` (``None``: both); NaN before any estimate."""
        paths = PATHS if path is None else (path,)
        total = sum(self.elements[p] for p in paths)
        return sum(self.bit_elements[p] for p in paths) / total if total else float("nan")

    def as_dict(self) -> dict[str, float]:
        """Kept fraction and average bits per path and overall (plain floats, for JSON)."""
        out: dict[str, float] = {}
        for p in (*PATHS, None):
            suffix = "" if p is None else f"_{p}"
            out[f"kept_fraction{suffix}"] = self.kept_fraction(p)
            out[f"average_bits{suffix}"] = self.average_bits(p)
        return out


_ACTIVE: list[GradStats] = []


@contextmanager
def record_grad_stats() -> Iterator[GradStats]:
    """Count every gradient estimate made by quantized layers inside the ``with`` block (nestable)."""
    stats = GradStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def record_estimate(path: str, rows: Tensor, estimate: Tensor, bits: int) -> None:
    """Add one estimate (``rows`` and ``estimate`` as ``(groups, D)`` views) to every active recorder."""
    if not _ACTIVE:
        return
    with torch.no_grad():
        nonzero = rows.reshape(rows.shape[0], -1).ne(0).any(dim=1)
        kept = nonzero & estimate.reshape(estimate.shape[0], -1).ne(0).any(dim=1)
        n_groups, n_kept = int(nonzero.sum()), int(kept.sum())
    width = rows[0].numel() if rows.shape[0] else 0
    for stats in _ACTIVE:
        stats.groups[path] += n_groups
        stats.kept[path] += n_kept
        stats.elements[path] += n_groups * width
        stats.bit_elements[path] += n_kept * width * bits
