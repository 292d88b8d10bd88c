"""Scales moved into their own param groups after the optimizer and scheduler exist (drop-in callback path).

Reference: the same optimizer built with the split layout from the start and a scheduler constructed on it; the
split-then-extended scheduler must produce the same learning rates in every group at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lightning_dbq as dbq
from lightning_dbq.training.alrs import GROUP_KEY, LAYER_KEY
from lightning_dbq.training.regroup import extend_scheduler, split_scale_groups
from tests.helpers.tiny import TinyNet

S = torch.optim.lr_scheduler


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = dbq.prepare(TinyNet(), bits=[8, 4, 2])
    m(torch.randn(2, 3, 8, 8))  # initialise activation scales
    return m


def _user_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two user groups (as a user would: backbone and head with their own lr/wd)."""
    head = list(model.fc.parameters())
    ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": body, "lr": 1e-3, "weight_decay": 0.05}, {"params": head, "lr": 1e-2, "weight_decay": 0.1}]


SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "lambda": lambda o: S.LambdaLR(o, lambda e: 0.9**e),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=[g["lr"] for g in o.param_groups], total_steps=20),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=10),
    "step": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "sequential": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.ExponentialLR(o, gamma=0.9)], milestones=[3]
    ),
    "plateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_extended_scheduler_equals_scheduler_built_on_split_groups(name: str) -> None:
    model = _model()
    factor = 0.5
    # reference: the split layout exists before the scheduler is built
    ref_opt = torch.optim.Adam(_user_groups(model))
    split = split_scale_groups(ref_opt, model, lr_factor=factor)
    ref_sched = SCHEDULERS[name](ref_opt)
    # under test: scheduler built first, then the split, then the extension
    opt = torch.optim.Adam(_user_groups(model))
    sched = SCHEDULERS[name](opt)
    split2 = split_scale_groups(opt, model, lr_factor=factor)
    assert split2 == split
    # (OneCycleLR keeps its per-group state in the groups, which the split copied with the lr keys scaled)
    assert extend_scheduler(sched, split2, factor) == []
    for step in range(12):
        for o in (ref_opt, opt):
            o.step()
        if name == "plateau":
            ref_sched.step(1.0)
            sched.step(1.0)
        else:
            ref_sched.step()
            sched.step()
        got = [g["lr"] for g in opt.param_groups]
        expect = [g["lr"] for g in ref_opt.param_groups]
        assert got == pytest.approx(expect, rel=1e-6), (name, step)
    # every scale group follows its source at the factor
    for src, g in zip(split.sources, opt.param_groups[split.n_before :], strict=True):
        assert g["lr"] == pytest.approx(factor * opt.param_groups[src]["lr"], rel=1e-6)
    assert opt.param_groups[0]["lr"] != pytest.approx(1e-3)  # the scheduler did move the rates


def test_split_layout_tags_weight_decay_and_keeps_every_parameter_once() -> None:
    model = _model()
    opt = torch.optim.AdamW(_user_groups(model))
    before = {id(p) for g in opt.param_groups for p in g["params"]}
    split = split_scale_groups(opt, model, lr_factor=0.1, weight_decay=0.0)
    after = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(after) == sorted(before) and len(after) == len(set(after))
    new = opt.param_groups[split.n_before :]
    layers = {g[LAYER_KEY] for g in new if g[GROUP_KEY] == "weight_scales"}
    assert layers == {"conv2", "conv3"}  # one group per quantized layer (ALRS keys on each layer's bits)
    assert {g[GROUP_KEY] for g in new} == {"weight_scales", "act_scales"}
    assert all(g["weight_decay"] == 0.0 and g["lr"] == pytest.approx(1e-4) for g in new)  # source group 0: 1e-3
    scale_ids = {id(p) for g in new for p in g["params"]}
    assert all(id(p) not in scale_ids for g in opt.param_groups[: split.n_before] for p in g["params"])
    assert split.moved == 2 + 2 * 3  # two weight scales, 3 per-bit activation scales on each of two layers
    # idempotent: a second split finds nothing untagged to move
    assert split_scale_groups(opt, model).sources == ()


def test_optimizer_that_refuses_new_groups_is_left_intact() -> None:
    model = _model()
    opt = torch.optim.LBFGS(model.parameters())
    before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(TypeError, match="LBFGS does not accept new param groups"):
        split_scale_groups(opt, model)
    assert [list(g["params"]) for g in opt.param_groups] == before


def test_cyclic_extension_copies_source_entries() -> None:
    model = _model()
    opt = torch.optim.SGD(_user_groups(model), momentum=0.9)
    sched = S.CyclicLR(opt, base_lr=[1e-4, 1e-3], max_lr=[1e-2, 1e-1], step_size_up=2)
    split = split_scale_groups(opt, model, lr_factor=0.5)
    assert extend_scheduler(sched, split, 0.5) == []
    assert len(sched.base_lrs) == len(sched.max_lrs) == len(opt.param_groups)
    for _ in range(3):
        opt.step()
        sched.step()
    for src, g in zip(split.sources, opt.param_groups[split.n_before :], strict=True):
        assert g["lr"] == pytest.approx(0.5 * opt.param_groups[src]["lr"])


def test_unknown_per_group_state_is_reported() -> None:
    class Custom(S.LRScheduler):
        def __init__(self, o: Any) -> None:
            self.my_factors = [1.0] * len(o.param_groups)
            super().__init__(o)

        def get_lr(self) -> list[float]:
            return [b * f for b, f in zip(self.base_lrs, self.my_factors, strict=True)]

    model = _model()
    opt = torch.optim.Adam(_user_groups(model))
    sched = Custom(opt)
    split = split_scale_groups(opt, model)
    assert extend_scheduler(sched, split) == ["Custom.my_factors"]
