"""Block Householder quantization (BHQ, Chen et al., NeurIPS 2020), a simple faithful version.

Rows (samples) are sorted by range. Following StatQuant's ``get_transform``, the ``nz`` smallest rows are handed out
to the large ones in proportion to their ranges (``nz`` = the first count at which the smallest large row would get
more than one small row), so each large row ``i`` heads a block of ``sz_i = 1 + n_i`` rows. In every block the rows
are scaled (large row by ``s₁``, small rows by ``s₂``, ``s ∝ w^(-1/3)`` with ``w₁ = λ₁/√sz``,
``w₂ = λ₂·max|H|/(sz − 1)``, ``λ`` the ranges of the large row and of the largest small row) and the Householder
reflection ``H = I − 2vvᵀ`` that maps ``e₁`` to ``1/√sz`` is applied, spreading the large row's magnitude over the
block: ``T = H·diag(s)``, ``T⁻¹ = diag(1/s)·H``. Each transformed row is then quantized as its own group and
``T⁻¹`` is applied. ``T`` is linear, invertible and fixed given ``gY``, so ``E[T⁻¹ Q(T g)] = g``: unbiased.

Choices (documented differences from StatQuant): blocks are applied as scatter/gather over rows (``O(G·D)``, no dense
``G×G`` matrix); ranges are floored at ``1e-6·max range`` so that all-zero rows get a finite scale; a block of size
1 is the identity; the last cumulative count is forced to ``nz`` (StatQuant asserts it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HouseholderPlan", "householder_max", "householder_plan"]


@dataclass(frozen=True)
class HouseholderPlan:
    """Per-row block index, Householder vector entry and scale: ``T x = H (s ⊙ x)`` block-wise."""

    block: Tensor  # (G,) int64, block of each row
    v: Tensor  # (G,) entry of the block's unit Householder vector for this row (0 in size-1 blocks)
    s: Tensor  # (G,) row scale
    blocks: int

    def _reflect(self, x: Tensor) -> Tensor:
        v = self.v.to(x.dtype)[:, None]
        dots = torch.zeros(self.blocks, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, self.block, v * x)
        return x - 2.0 * v * dots[self.block]

    def apply(self, rows: Tensor) -> Tensor:
        """``T rows`` for ``rows`` ``(G, D)``."""
        return self._reflect(rows * self.s.to(rows.dtype)[:, None])

    def invert(self, rows: Tensor) -> Tensor:
        """``T⁻¹ rows``."""
        return self._reflect(rows) / self.s.to(rows.dtype)[:, None]


def householder_max(size: int) -> float:
    """``max |H_ij|`` of the reflection of size ``size`` mapping ``e₁`` to ``1/√size·1`` (closed form)."""
    if size < 2:
        return 1.0
    a = 1.0 / (size - math.sqrt(size))  # 2·v_j² for the non-leading entries; off-diagonal entries are -a
    return max(1.0 / math.sqrt(size), abs(1.0 - a), a if size >= 3 else 0.0)


def householder_plan(ranges: Tensor) -> HouseholderPlan:
    """The BHQ block plan of rows with the given ``ranges`` (``(G,)``, non-negative); computed on the CPU.

    Returns:
        a :class:`HouseholderPlan` on ``ranges.device``.
    """
    device = ranges.device
    r = ranges.detach().to("cpu", torch.float64).flatten()
    n = r.numel()
    if n < 2 or float(r.max()) <= 0.0:
        return _identity(n, device)
    r = r.clamp_min(1e-6 * float(r.max()))
    vals, order = torch.sort(r, descending=True, stable=True)
    csum = torch.cumsum(vals, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # candidate numbers of small rows
    idx = (n - k - 1).long()  # position of the smallest remaining large row
    num = k * vals[idx] / csum[idx]
    hits = torch.nonzero(num > 1.0)
    nz = int(k[hits[0, 0]]) if hits.numel() else n - 1
    nnz = n - nz
    total = float(csum[nnz - 1])
    nums = torch.round(torch.cumsum(nz * vals[:nnz] / total, 0)).long().clamp(0, nz)
    nums[-1] = nz
    nums = torch.cummax(nums, 0).values
    counts = torch.diff(nums, prepend=torch.zeros(1, dtype=torch.long))
    sizes = counts + 1

    block = torch.empty(n, dtype=torch.long)
    v = torch.zeros(n, dtype=torch.float64)
    s = torch.ones(n, dtype=torch.float64)
    block[order[:nnz]] = torch.arange(nnz)
    small_pos = torch.arange(nz)
    small_block = torch.searchsorted(nums, small_pos, right=True)
    block[order[nnz:]] = small_block

    sz = sizes.to(torch.float64)
    root = sz.sqrt()
    norm = torch.sqrt((2.0 - 2.0 / root).clamp_min(1e-300))
    v_lead = torch.where(sizes > 1, (1.0 / root - 1.0) / norm, torch.zeros_like(sz))
    v_small = torch.where(sizes > 1, (1.0 / root) / norm, torch.zeros_like(sz))
    hmax = torch.tensor([householder_max(int(x)) for x in sizes], dtype=torch.float64)
    first_small = (nnz + nums - counts).clamp(max=n - 1)  # sorted position of each block's largest small row
    lam1, lam2 = vals[:nnz], vals[first_small]
    w1 = lam1 / root
    w2 = lam2 * hmax / (sz - 1.0).clamp_min(1.0)
    s1, s2 = w1.pow(-1.0 / 3.0), w2.pow(-1.0 / 3.0)
    scale = torch.sqrt(1.0 / s1**2 + 1.0 / s2**2)
    multi = sizes > 1
    s1 = torch.where(multi, s1 * scale, torch.ones_like(s1))
    s2 = torch.where(multi, s2 * scale, torch.ones_like(s2))

    v[order[:nnz]] = v_lead
    s[order[:nnz]] = s1
    v[order[nnz:]] = v_small[small_block]
    s[order[nnz:]] = s2[small_block]
    return HouseholderPlan(block=block.to(device), v=v.to(device), s=s.to(device), blocks=nnz)


def _identity(n: int, device: torch.device) -> HouseholderPlan:
    return HouseholderPlan(
        block=torch.arange(n, device=device),
        v=torch.zeros(n, dtype=torch.float64, device=device),
        s=torch.ones(n, dtype=torch.float64, device=device),
        blocks=n,
    )
