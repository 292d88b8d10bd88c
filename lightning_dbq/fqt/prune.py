"""Group pruning for "average-1-bit" gradients: unbiased AGP (water-filled Bernoulli masks) and biased top-K.

AGP keeps group ``i`` with probability ``p_i = min(1, c·R_i)``, ``c`` chosen by water-filling so that
``Σ p_i = K = max(keep·G, 1)`` (capped at the number of groups with ``R_i > 0``), and rescales kept groups by
``1/p_i``: ``E[(m_i/p_i)·g_i] = g_i``. ``p ∝ R`` approximately minimises ``Σ (1/p_i)(‖g_i‖² + D·R_i²/(4B²))``
under ``Σ p = K``. The 1-bit-FQT public code instead keeps the ``int(G·keep)`` groups with the largest ``max|g|``
and does not rescale, so its estimate is biased (kept here as ``topk`` for the study).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_weights", "keep_count", "topk_mask", "water_fill"]


def keep_count(groups: int, keep: float) -> float:
    """``K = keep·G``, at least one group (at most ``G``)."""
    return min(max(keep * groups, 1.0), float(groups))


def group_weights(rows: Tensor) -> Tensor:
    """AGP importance of each row of ``rows`` ``(G, D)``: its range ``max − min``.

    A constant non-zero row has range 0 but is not zero; it gets ``max|g|`` instead, so that pruning stays unbiased
    (a row that can never be kept would be a bias). All-zero rows get 0 and so ``p = 0``.
    """
    lo = rows.amin(dim=1)
    hi = rows.amax(dim=1)
    rng = hi - lo
    return torch.where(rng > 0, rng, rows.abs().amax(dim=1))


def water_fill(weights: Tensor, k: float) -> Tensor:
    """Probabilities ``p_i = min(1, c·w_i)`` with ``Σ p = min(k, #{w_i > 0})`` (float64, sync-free).

    Args:
        weights: non-negative 1-D weights (zero weight → ``p = 0``).
        k: the expected number of kept groups, ``> 0``.

    Returns:
        ``p`` (float64, same device), ``0 <= p <= 1``, ``p ∝ w`` below saturation.
    """
    w = weights.detach().to(torch.float64).flatten()
    n = w.numel()
    if n == 0:
        return w
    ws, _ = torch.sort(w, descending=True)
    suffix = torch.flip(torch.cumsum(torch.flip(ws, [0]), 0), [0])  # Σ_{i >= j} ws_i
    j = torch.arange(n, device=w.device, dtype=torch.float64)
    c = (k - j) / suffix.clamp_min(torch.finfo(torch.float64).tiny)
    # j top groups saturated, the rest proportional: feasible iff c_j·ws_j <= 1 (the smallest such j is the answer)
    valid = (j < k) & (suffix > 0) & (c * ws <= 1.0)
    first = torch.argmax(valid.to(torch.int8))
    c_star = torch.where(valid.any(), c[first], torch.full_like(c[first], torch.inf))
    p = torch.clamp(c_star * w, max=1.0)
    return torch.where(w > 0, p, torch.zeros_like(p))


def topk_mask(rows: Tensor, keep: float) -> Tensor:
    """Boolean mask of the ``max(int(G·keep), 1)`` rows with the largest ``max|g|`` (deterministic, biased)."""
    g = rows.shape[0]
    k = min(max(int(g * keep), 1), g)
    score = rows.detach().abs().amax(dim=1)
    mask = torch.zeros(g, dtype=torch.bool, device=rows.device)
    mask[torch.topk(score, k).indices] = True
    return mask
