"""Quantizer modules: init rules, positivity, per-bit independence, DDP-free lazy init."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dbq.quant.functional import double_round_codes
from lightning_dbq.quant.quantizers import ActQuantizer, WeightQuantizer


def test_weight_scale_initialised_for_lowest_bit() -> None:
    w = torch.randn(64, 32, 3, 3)
    q = WeightQuantizer(w, bits=[8, 6, 4, 2])
    expect = 2 * w.abs().mean().item() / math.sqrt(1) / 2 ** (8 - 2)  # Q_P(2) = 1
    assert q.effective_scale().item() == pytest.approx(expect, rel=1e-6)
    assert q.scale.item() == 1.0  # stored relative to its initial value
    # low bits are not all zeros with this init (the LSQ-at-8-bit init makes every 2-bit code 0)
    _, q2 = double_round_codes(w, q.effective_scale(), 8, 2)
    assert (q2 != 0).float().mean() > 0.3


def test_per_channel_scale_shape_and_values() -> None:
    w = torch.randn(8, 4, 3, 3) * torch.arange(1, 9).view(8, 1, 1, 1)
    q = WeightQuantizer(w, bits=[8, 4], per_channel=True)
    assert q.scale.shape == (8, 1, 1, 1) and q.scale_ref.shape == (8, 1, 1, 1)
    expect = 2 * w.abs().reshape(8, -1).mean(1) / math.sqrt(7) / 2**4
    torch.testing.assert_close(q.effective_scale().detach().view(-1), expect)
    out = q(w)
    assert out.shape == w.shape


def test_scale_stays_positive_under_huge_negative_steps() -> None:
    w = torch.randn(16, 16)
    q = WeightQuantizer(w, bits=[8, 4, 2])
    opt = torch.optim.SGD(q.parameters(), lr=1e6)
    for b in (8, 4, 2):
        q.active_bits = b
        opt.zero_grad()
        (q(w) * 1e3).sum().backward()  # large gradients, huge lr: the raw parameter overshoots far below zero
        opt.step()
        assert q.effective_scale().item() > 0
        assert torch.isfinite(q(w)).all()
    q.scale.data.fill_(-123.0)
    assert q.effective_scale().item() == pytest.approx(123.0 * q.scale_ref.item())


def test_weight_gradient_scale_uses_numel_and_qp_of_high_bits() -> None:
    w = torch.randn(10, 10)
    q = WeightQuantizer(w, bits=[8, 4])
    q.active_bits = 4
    q(w).sum().backward()
    g_scaled = q.scale.grad.item() * q.scale_ref.item()  # the parameter's gradient is ∂L/∂s / s_ref
    s = q.effective_scale().detach().clone().requires_grad_(True)
    from lightning_dbq.quant.functional import double_round_fake

    double_round_fake(w, s, 8, 4, g=1.0).sum().backward()
    assert g_scaled == pytest.approx(s.grad.item() / math.sqrt(100 * 127), rel=1e-5)


def test_act_quantizer_init_unsigned_and_signed() -> None:
    relu_in = torch.rand(4, 8, 5, 5)
    a = ActQuantizer([8, 4, 2])
    out = a(relu_in)
    assert not bool(a.signed) and bool(a.initialized)
    for b in (8, 4, 2):
        q_p = 2**b - 1
        assert a.scales[str(b)].item() == pytest.approx(2 * relu_in.abs().mean().item() / math.sqrt(q_p), rel=1e-5)
    assert out.min() >= 0
    s = ActQuantizer([8, 4])
    x = torch.randn(4, 8)
    s(x)
    assert bool(s.signed)
    assert s.scales["4"].item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)


def test_act_quantizer_levels_and_per_bit_parameters() -> None:
    a = ActQuantizer([8, 4, 2])
    x = torch.rand(16, 32)
    a(x)
    a.active_bits = 2
    assert a(x).unique().numel() <= 4
    a.scales.zero_grad()
    a(x).sum().backward()
    grads = {b: p.grad for b, p in a.scales.items()}
    assert grads["2"] is not None and grads["8"] is None and grads["4"] is None


def test_disabled_quantizers_are_identity() -> None:
    w, x = torch.randn(5, 5), torch.randn(3, 5)
    q, a = WeightQuantizer(w, [8, 2]), ActQuantizer([8, 2])
    q.enabled = a.enabled = False
    assert torch.equal(q(w), w) and torch.equal(a(x), x)
    assert not bool(a.initialized)


def test_act_quantizer_state_dict_load_refreshes_cached_flags() -> None:
    signed_q, unsigned_q = ActQuantizer([8, 4]), ActQuantizer([8, 4])
    signed_q(torch.randn(4, 8))
    unsigned_q(torch.rand(4, 8))
    assert bool(signed_q.signed) and not bool(unsigned_q.signed)
    unsigned_q.load_state_dict(signed_q.state_dict())  # an already-initialised quantizer gets new state
    x = torch.tensor([[-1.0, 0.5]])
    assert unsigned_q(x)[0, 0] < 0  # now signed: negative inputs survive
    fresh = ActQuantizer([8, 4])
    fresh.load_state_dict(signed_q.state_dict())
    assert torch.equal(fresh(x), signed_q(x))
    assert fresh.scales["8"].item() == signed_q.scales["8"].item()  # not re-initialised from this batch
