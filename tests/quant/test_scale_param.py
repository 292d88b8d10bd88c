"""The shared weight scale is stored relative to its initial value (the cause of the drop-in 2-bit collapse).

SGD must move the scale exactly as plain LSQ on the raw scale would; Adam must move it by a step relative to the
scale (a raw-scale Adam step of ``lr`` is larger than the scale itself at low bits); old state dicts load exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dbq.quant.functional import double_round_fake, lsq_grad_scale, qrange
from lightning_dbq.quant.quantizers import SCALE_EPS, WeightQuantizer


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_channel", [False, True])
def test_sgd_step_equals_lsq_step_on_the_raw_scale(bits: int, per_channel: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 5, 3, 3) * 0.05
    target = torch.randn_like(w) * 0.05
    q = WeightQuantizer(w, bits=[8, 4, 2], per_channel=per_channel, kernel="eager")  # same kernel as the reference
    q.active_bits = bits
    s_raw = q.effective_scale().detach().clone().requires_grad_(True)  # independent reference: LSQ on s itself
    g = lsq_grad_scale(w[0].numel() if per_channel else w.numel(), qrange(8, signed=True)[1])
    ((double_round_fake(w, s_raw, 8, bits, g) - target) ** 2).sum().backward()
    lr = 0.2 * float(s_raw.min() / s_raw.grad.abs().max())  # a step of at most 20 % of the scale
    expect = s_raw.detach() - lr * s_raw.grad
    assert (expect > 0).all()

    opt = torch.optim.SGD([q.scale], lr=lr)
    ((q(w) - target) ** 2).sum().backward()
    opt.step()
    torch.testing.assert_close(q.effective_scale().detach(), expect, rtol=1e-5, atol=1e-12)
    assert not torch.equal(expect, s_raw.detach())  # the step moved the scale


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_adam_step_is_relative_to_the_scale(magnitude: float) -> None:
    """Adam's first step is ±lr in parameter units: here ±lr·s_ref, whatever the weights' magnitude."""
    torch.manual_seed(0)
    w = torch.randn(32, 16) * magnitude
    q = WeightQuantizer(w, bits=[8, 4, 2])
    q.active_bits = 2
    s0 = q.effective_scale().item()
    opt = torch.optim.Adam([q.scale], lr=5e-3)
    ((q(w) - 0.5 * w) ** 2).sum().backward()
    opt.step()
    rel = abs(q.effective_scale().item() - s0) / s0
    assert rel == pytest.approx(5e-3, rel=1e-3)


def test_adam_keeps_the_scale_away_from_zero_where_the_raw_scale_crossed_it() -> None:
    """Twenty Adam steps at lr 5e-3 pushing the scale down: the raw scale (~1e-3) is driven through zero, the
    relative one shrinks by at most (1 - 5e-3)^20-ish and never changes sign."""
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.05
    q = WeightQuantizer(w, bits=[8, 2])
    raw = q.effective_scale().detach().clone().requires_grad_(True)
    opt_q, opt_raw = torch.optim.Adam([q.scale], lr=5e-3), torch.optim.Adam([raw], lr=5e-3)
    s0 = raw.item()
    for _ in range(20):
        for opt, s in ((opt_q, None), (opt_raw, raw)):
            opt.zero_grad()
            scale = q.effective_scale() if s is None else s
            scale.sum().backward()  # d/ds of s: always "make it smaller"
            opt.step()
    assert raw.item() < 0 < s0  # the raw parameter crossed zero (the old behaviour behind |p|)
    assert q.scale.item() > 0.85 and q.effective_scale().item() > 0.85 * s0


def test_state_dict_without_scale_ref_loads_exactly() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    old_raw = torch.tensor(-0.0123)  # an old checkpoint stored the raw parameter p (s = |p| + eps)
    q = WeightQuantizer(w, bits=[8, 4, 2])
    state = {k: v for k, v in q.state_dict().items() if k != "scale_ref"}
    state["scale"] = old_raw.clone()
    q.load_state_dict(state)
    old_scale = old_raw.abs() + SCALE_EPS
    assert q.effective_scale().item() == old_scale.item()
    for b in (8, 4, 2):
        q.active_bits = b
        assert torch.equal(q(w), double_round_fake(w, old_scale, 8, b, 1.0))
    assert math.isclose(q.scale.item(), 1.0)
