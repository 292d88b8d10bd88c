"""ALRS factors, param groups and their interplay with LR schedulers; KD loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lightning_dbq as dbq
from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.training.alrs import GROUP_KEY, alrs_factor, eq6_factor, param_groups, scaled_scale_lr
from lightning_dbq.training.distill import kd_loss
from tests.helpers.tiny import TinyNet


@pytest.mark.parametrize(
    ("bits", "high", "eta"),
    [(8, 8, 1.0), (7, 8, 0.5), (6, 8, 0.1), (5, 8, 0.05), (4, 8, 0.01), (3, 8, 0.005), (2, 8, 0.001),
     (4, 4, 1.0), (3, 4, 0.5), (2, 4, 0.1)],
)  # fmt: skip
def test_alrs_factor_matches_design(bits: int, high: int, eta: float) -> None:
    delta = high - bits
    # independent restatement of DESIGN.md: even Δ -> 10^(-Δ/2); odd Δ -> 5·10^(-(Δ+1)/2)
    ref = 10 ** (-delta / 2) if delta % 2 == 0 else 5 * 10 ** (-(delta + 1) / 2)
    assert alrs_factor(bits, high) == pytest.approx(ref)
    assert alrs_factor(bits, high) == pytest.approx(eta)


def test_alrs_factor_rejects_bits_above_high() -> None:
    with pytest.raises(ValueError, match="must not exceed high_bits"):
        alrs_factor(8, 4)


def test_eq6_factor_is_floored_at_zero() -> None:
    grads = [torch.full((3,), 5.0), torch.tensor([0.5, -0.2])]
    # mean of min(max|clip(g,1)|, 1) = (1 + 0.5) / 2 = 0.75; lambda=5e-4 -> negative -> 0
    assert eq6_factor(0.1, 5e-4, grads) == 0.0
    assert eq6_factor(0.1, 2.0, grads) == pytest.approx(0.1 * (2.0 - 0.75) / 2.0)


def _prepared() -> torch.nn.Module:
    model = dbq.prepare(TinyNet(), bits=[8, 4, 2])
    model(torch.randn(2, 3, 8, 8))
    return model


def test_param_groups_partition_parameters() -> None:
    model = _prepared()
    groups = param_groups(model, lr=1e-3, weight_decay=5e-5, scale_lr=1e-4)
    by_tag = {g[GROUP_KEY]: g for g in groups}
    assert set(by_tag) == {"weights", "weight_scales", "act_scales"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert by_tag["weight_scales"]["weight_decay"] == 0.0 and by_tag["weight_scales"]["lr"] == 1e-4
    assert [g["dbq_layer"] for g in groups if g[GROUP_KEY] == "weight_scales"] == ["conv2", "conv3"]
    assert by_tag["weights"]["weight_decay"] == 5e-5


@pytest.mark.parametrize(("lr", "latent_lr", "expected"), [(5e-4, None, 1e-2), (5e-2, None, 5e-2), (5e-4, 3e-3, 3e-3)])
def test_binary_latent_weights_get_their_floor(lr: float, latent_lr: float | None, expected: float) -> None:
    model = dbq.prepare(TinyNet(), bits=[1], weight_mode="binary")
    model(torch.randn(2, 3, 8, 8))
    groups = param_groups(model, lr=lr, weight_decay=5e-5, latent_lr=latent_lr)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    latent = [g for g in groups if g[GROUP_KEY] == "latent_weights"]
    assert len(latent) == 1 and latent[0]["lr"] == expected and latent[0]["weight_decay"] == 5e-5
    quantized = {id(q.layer.weight) for q in iter_quantizers(model)}
    assert {id(p) for p in latent[0]["params"]} == quantized and quantized
    assert next(g for g in groups if g[GROUP_KEY] == "weights")["lr"] == lr  # biases, norms, FP layers: lr


def test_multi_bit_modes_have_no_latent_group() -> None:
    groups = param_groups(_prepared(), lr=1e-3, latent_lr=1e-1)
    assert "latent_weights" not in {g[GROUP_KEY] for g in groups}


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "cosine"])
def test_groups_work_with_schedulers_and_scaling_restores_lr(kind: str) -> None:
    model = _prepared()
    opt = torch.optim.Adam(param_groups(model, lr=1e-3, scale_lr=1e-3))
    if kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    elif kind == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3] * len(opt.param_groups), total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    for _ in range(5):
        before = [g["lr"] for g in opt.param_groups]
        for b in (8, 4, 2):
            dbq.set_bits(model, b)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with scaled_scale_lr(opt, alrs_factor(b, 8)):
                tagged = [g["lr"] for g in opt.param_groups if g[GROUP_KEY] == "weight_scales"]
                assert tagged == [pytest.approx(before[1] * alrs_factor(b, 8))] * 2
                opt.step()
            assert [g["lr"] for g in opt.param_groups] == before  # restored exactly
        sched.step()
    ref_lrs = [g["lr"] for g in opt.param_groups]
    assert all(math.isfinite(v) and v > 0 for v in ref_lrs)


def test_kd_loss_matches_manual_kl() -> None:
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p_t = F.softmax(t / 2.0, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / 2.0, -1))).sum(-1).mean() * 4.0
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(manual.item(), rel=1e-5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
