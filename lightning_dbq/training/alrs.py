"""ALRS: per-bit learning rates for the quantization scales, and the optimizer param-group helper.

η_b (docs/math.md §5.2), relative to the highest bit h, Δ = h − b:

* Δ even: ``η_b = 10^(−Δ/2)``        (8→1, 6→0.1, 4→0.01, 2→0.001 for {8,6,4,2})
* Δ odd:  ``η_b = 5·10^(−(Δ+1)/2)``  ({4,3,2}: 4→1, 3→0.5, 2→0.1)

The shared Double Rounding weight scale receives gradients ~2^k larger at low bits (docs/math.md §2.2); in Algorithm
A.2 each bit's optimizer step uses ``lr·η_b`` for the weight-scale group. Mode ``"eq6"`` adds the paper's
gradient-dependent term ``λ_b = η_b·(λ − (1/L)·Σ_i min(max|clip(∇s_b^i, 1)|, 1))``, floored at 0 because, taken
literally, it goes negative when λ < 1 (it is measured against plain η_b in the CIFAR-10 ablation).
Activation scales are per bit (never shared), so by default they keep the base learning rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.quant.norm import PerBitNorm

__all__ = [
    "ALRS_MODES",
    "GROUP_KEY",
    "LAYER_KEY",
    "alrs_factor",
    "classify_params",
    "eq6_factor",
    "latent_weight_lrs",
    "param_groups",
    "scaled_scale_lr",
]

from lightning_dbq.options import ALRS_MODES  # noqa: E402

GROUP_KEY = "dbq_group"
LAYER_KEY = "dbq_layer"


def alrs_factor(bits: int, high_bits: int) -> float:
    """η_b for ``bits`` relative to the stored precision ``high_bits``.

    Example:
        >>> [alrs_factor(b, 8) for b in (8, 6, 4, 2)]
        [1.0, 0.1, 0.01, 0.001]
        >>> [alrs_factor(b, 4) for b in (4, 3, 2)]
        [1.0, 0.5, 0.1]
    """
    delta = high_bits - bits
    if delta < 0:
        raise ValueError(f"bits={bits} must not exceed high_bits={high_bits}")
    if delta % 2 == 0:
        return float(10.0 ** (-delta // 2))
    return float(5.0 * 10.0 ** (-(delta + 1) // 2))


def eq6_factor(eta: float, base_lr: float, scale_grads: Sequence[torch.Tensor | None]) -> float:
    """The paper's eq. 6 multiplier ``η_b·(λ − mean_i min(max|clip(g_i, 1)|, 1))`` relative to ``λ``, floored at 0.

    Returns the factor to multiply ``λ`` with (so ``λ_b = λ·factor``).
    """
    grads = [g for g in scale_grads if g is not None]
    if not grads or base_lr <= 0:
        return eta
    term = sum(float(g.detach().clamp(-1.0, 1.0).abs().max().clamp(max=1.0)) for g in grads) / len(grads)
    return max(eta * (base_lr - term) / base_lr, 0.0)


def classify_params(model: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """Kinds of a prepared model's parameters by ``id``: ``"weight_scales"``, ``"act_scales"`` or ``"norms"``
    (anything else is a weight), and the layer name owning each weight scale."""
    kinds: dict[int, str] = {}
    layer_of: dict[int, str] = {}
    for q in iter_quantizers(model):
        for p in q.weight_quant.parameters():
            kinds[id(p)] = "weight_scales"
            layer_of[id(p)] = q.name
        if q.act_quant is not None:
            for p in q.act_quant.parameters():
                kinds[id(p)] = "act_scales"
    for m in model.modules():
        if isinstance(m, PerBitNorm):
            for p in m.parameters():
                kinds.setdefault(id(p), "norms")
    return kinds, layer_of


def latent_weight_lrs(model: nn.Module, lr: float, latent_lr: float | None = None) -> dict[int, float]:
    """Learning rates of latent weights whose mode declares a floor, by parameter ``id``.

    A weight mode whose quantizer class sets ``min_useful_lr`` (binary: its weights only change where a latent
    weight crosses the channel mean) trains each quantized layer's ``weight`` at ``latent_lr`` when given, else at
    ``max(lr, min_useful_lr)``. Layers of other modes are absent (they train at ``lr``).
    """
    out: dict[int, float] = {}
    for q in iter_quantizers(model):
        floor = type(q.weight_quant).min_useful_lr
        weight = getattr(q.layer, "weight", None)
        if floor is None or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        out[id(weight)] = float(latent_lr) if latent_lr is not None else max(lr, floor)
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    scale_lr: float | None = None,
    scale_weight_decay: float = 0.0,
    latent_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer param groups for a prepared model, for use inside ``configure_optimizers``.

    Groups (each tagged with ``dbq_group``): ``weights`` (every non-quantizer parameter, with ``weight_decay``),
    ``weight_scales`` (the shared Double Rounding scales, ONE GROUP PER LAYER tagged ``dbq_layer`` so ALRS can key
    on each layer's bits in mixed precision) and ``act_scales`` (per-bit activation scales); scale groups use
    ``scale_weight_decay`` (default 0) and ``scale_lr`` (default ``lr``). Weights of modes with a learning-rate
    floor (binary) form ``latent_weights`` groups, one per learning rate (:func:`latent_weight_lrs`; ``latent_lr``
    sets it explicitly), with ``weight_decay``. Build schedulers *after* this (LambdaLR / OneCycleLR / cosine all
    work because the groups exist before the scheduler).
    """
    kinds, layer_of = classify_params(model)
    latent = latent_weight_lrs(model, lr, latent_lr)
    buckets: dict[str, list[nn.Parameter]] = {"weights": [], "weight_scales": [], "act_scales": []}
    by_lr: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in latent:
            by_lr.setdefault(latent[id(p)], []).append(p)
            continue
        buckets["weights" if kinds.get(id(p), "weights") == "norms" else kinds.get(id(p), "weights")].append(p)
    s_lr = lr if scale_lr is None else scale_lr
    groups = [{"params": buckets["weights"], "lr": lr, "weight_decay": weight_decay, GROUP_KEY: "weights"}]
    groups += [{"params": ps, "lr": g_lr, "weight_decay": weight_decay, GROUP_KEY: "latent_weights"}
               for g_lr, ps in by_lr.items()]  # fmt: skip
    per_layer: dict[str, list[nn.Parameter]] = {}
    for p in buckets["weight_scales"]:
        per_layer.setdefault(layer_of[id(p)], []).append(p)
    for layer, ps in per_layer.items():
        groups.append({"params": ps, "lr": s_lr, "weight_decay": scale_weight_decay, GROUP_KEY: "weight_scales",
                       LAYER_KEY: layer})  # fmt: skip
    if buckets["act_scales"]:
        groups.append({"params": buckets["act_scales"], "lr": s_lr, "weight_decay": scale_weight_decay,
                       GROUP_KEY: "act_scales"})  # fmt: skip
    return groups


@contextlib.contextmanager
def scaled_scale_lr(
    optimizer: Any,
    factor: float,
    groups: Sequence[str] = ("weight_scales",),
    per_layer: Mapping[str, float] | None = None,
) -> Iterator[None]:
    """Multiply the lr of the tagged scale groups by ``factor`` for one step, then restore it exactly.

    ``per_layer`` (mixed precision) overrides the factor of groups tagged with that ``dbq_layer``. Restoring keeps
    LR schedulers (which own ``group['lr']``) unaffected.
    """
    tagged = [g for g in optimizer.param_groups if g.get(GROUP_KEY) in groups]
    saved = [g["lr"] for g in tagged]
    try:
        for g in tagged:
            f = per_layer.get(g.get(LAYER_KEY, ""), factor) if per_layer else factor
            g["lr"] = g["lr"] * f
        yield
    finally:
        for g, lr in zip(tagged, saved, strict=True):
            g["lr"] = lr
