"""Move quantization scales into their own param groups of a user's optimizer (for the drop-in callback).

A user's ``configure_optimizers`` knows nothing of quantization scales: they land in the user's groups with the
user's learning rate and weight decay, and ALRS (which acts on groups tagged ``dbq_group``) cannot act. After the
optimizers and schedulers exist (``Callback.on_fit_start``, before a checkpoint's optimizer state is restored),
:func:`split_scale_groups` takes every scale out of its group and adds tagged groups in the way Lightning's
fine-tuning callbacks add groups — ``optimizer.add_param_group`` with every hyperparameter copied from the group the
scale came from, the learning-rate keys multiplied by ``lr_factor`` and the weight decay replaced — and
:func:`extend_scheduler` gives every LR scheduler an entry for each new group (``base_lrs``, ``lr_lambdas``,
``min_lrs``, ... copied from the source group), so LambdaLR, OneCycleLR, cosine, ReduceLROnPlateau and friends keep
driving every group. The split is a pure function of the optimizer's groups, so it gives the same layout on
resume and the restored optimizer state fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_dbq.training.alrs import GROUP_KEY, LAYER_KEY, classify_params

__all__ = ["LR_KEYS", "Split", "extend_scheduler", "split_scale_groups"]

# group keys that hold a learning rate (scaled by lr_factor in the new groups); other keys are copied as they are
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# per-group lists kept by torch's LR schedulers: learning-rate valued (scaled) and others (copied)
_SCHED_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
_SCHED_COPY_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")
# optimizers that read only their first group (LBFGS caches param_groups[0]["params"] at construction)
_SINGLE_GROUP = ("LBFGS",)


@dataclass(frozen=True)
class Split:
    """The result of :func:`split_scale_groups`.

    Attributes:
        sources: for each new group (in order), the index of the group its parameters came from.
        moved: number of scale parameters moved.
        n_before: number of groups before the split.
    """

    sources: tuple[int, ...]
    moved: int
    n_before: int


def split_scale_groups(optimizer: Any, model: nn.Module, *, lr_factor: float = 1.0, weight_decay: float = 0.0) -> Split:
    """Move every quantization scale of ``model`` out of ``optimizer``'s untagged groups into tagged groups.

    Weight scales get one group per layer (tagged ``dbq_group="weight_scales"``, ``dbq_layer=<name>``, so ALRS can
    key on each layer's bits); activation scales one group per source group (``"act_scales"``). Groups that are
    already tagged (built with :func:`~lightning_dbq.training.alrs.param_groups`) are left alone.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        model: the prepared model whose scales to move.
        lr_factor: learning rate of the new groups relative to their source group.
        weight_decay: weight decay of the new groups (the method uses 0).

    Returns:
        What was moved (``sources`` is empty when there was nothing to move).

    Raises:
        TypeError: the optimizer refuses new param groups (e.g. LBFGS); its groups are left exactly as they were.
    """
    if type(optimizer).__name__ in _SINGLE_GROUP:
        raise TypeError(f"{type(optimizer).__name__} does not accept new param groups (it optimizes one group only)")
    kinds, layer_of = classify_params(model)
    n_before = len(optimizer.param_groups)
    plans: list[tuple[int, dict[str, Any]]] = []
    kept: list[list[Any]] = []
    moved = 0
    for gi, group in enumerate(optimizer.param_groups):
        if group.get(GROUP_KEY) is not None:
            kept.append(list(group["params"]))
            continue
        keep: list[Any] = []
        per_layer: dict[str, list[Any]] = {}
        acts: list[Any] = []
        for p in group["params"]:
            kind = kinds.get(id(p))
            if kind == "weight_scales":
                per_layer.setdefault(layer_of[id(p)], []).append(p)
            elif kind == "act_scales":
                acts.append(p)
            else:
                keep.append(p)
        kept.append(keep)
        hyper = {k: v for k, v in group.items() if k != "params"}
        for k in LR_KEYS:
            if isinstance(hyper.get(k), (int, float)):
                hyper[k] = hyper[k] * lr_factor
        if "weight_decay" in hyper:
            hyper["weight_decay"] = weight_decay
        for layer, ps in per_layer.items():
            plans.append((gi, {**hyper, "params": ps, GROUP_KEY: "weight_scales", LAYER_KEY: layer}))
        if acts:
            plans.append((gi, {**hyper, "params": acts, GROUP_KEY: "act_scales"}))
        moved += sum(len(ps) for ps in per_layer.values()) + len(acts)
    if not plans:
        return Split((), 0, n_before)
    original = [list(g["params"]) for g in optimizer.param_groups]
    try:
        for group, keep in zip(optimizer.param_groups, kept, strict=True):
            group["params"] = keep
        for _, new in plans:
            optimizer.add_param_group(new)
    except (ValueError, TypeError, RuntimeError) as e:
        del optimizer.param_groups[n_before:]
        for group, params in zip(optimizer.param_groups, original, strict=True):
            group["params"] = params
        raise TypeError(f"{type(optimizer).__name__} does not accept new param groups ({e})") from e
    return Split(tuple(gi for gi, _ in plans), moved, n_before)


def _per_group_entry(v: Any) -> bool:
    return isinstance(v, (int, float, torch.Tensor)) or callable(v)


def extend_scheduler(scheduler: Any, split: Split, lr_factor: float = 1.0) -> list[str]:
    """Give ``scheduler`` (and any schedulers it chains) one per-group entry for each group added by ``split``.

    Learning-rate lists (``base_lrs``, ``min_lrs``, ...) get the source group's value times ``lr_factor``;
    ``lr_lambdas`` and momentum lists get the source group's entry as is. Per-group state kept in the groups
    themselves (OneCycleLR's ``initial_lr`` / ``max_lr`` / ``min_lr``) was copied by :func:`split_scale_groups`.

    Returns:
        Names of list attributes with one entry per group that this function does not know (empty when every
        per-group list was extended); such a scheduler may not drive the new groups correctly.
    """
    unknown: list[str] = []
    for name, value in list(vars(scheduler).items()):
        if name == "_schedulers" and isinstance(value, Sequence):
            for inner in value:
                unknown += extend_scheduler(inner, split, lr_factor)
            continue
        if not isinstance(value, list) or len(value) != split.n_before or not all(map(_per_group_entry, value)):
            continue
        if name in _SCHED_LR_LISTS:
            value.extend([value[src] * lr_factor for src in split.sources])
        elif name in _SCHED_COPY_LISTS:
            value.extend([value[src] for src in split.sources])
        elif not name.startswith("_milestone"):
            unknown.append(f"{type(scheduler).__name__}.{name}")
    return unknown
