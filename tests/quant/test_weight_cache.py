"""The eval-mode weight cache of WeightQuantizer: used only in eval mode without grad, one entry per bit, dropped
whenever the weight or a scale changes (in-place, optimizer step, load_state_dict, new Parameter, device/dtype)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lightning_dbq as dbq
from lightning_dbq.quant import quantizers
from lightning_dbq.quant.kernels import Kernels
from lightning_dbq.quant.layers import DBQLayer

BITS = (8, 6, 4, 2)


class Net(nn.Module):
    """Three quantized convs (+ per-bit BNs) and a quantized linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(self.c3(x).mean(dim=(2, 3)))


N_LAYERS = 4


def _model(seed: int = 0, **kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = dbq.prepare(Net(), bits=BITS, quantize_first=True, quantize_last=True, **kw)
    x = torch.randn(2, 3, 16, 16)
    model.train()(x)  # initialise the activation scales
    return model.eval(), x


def _quantizers(model: nn.Module) -> list[quantizers.WeightQuantizer]:
    return [m.weight_quant for m in model.modules() if isinstance(m, DBQLayer)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts weight fake-quant kernel calls (calls whose input is a Parameter: weights, not activations)."""
    counter = {"n": 0}
    real_kernels, real_floor = quantizers.kernels, quantizers.floor_nest_fake

    def counted(fn):
        def call(x, *args, **kwargs):
            if isinstance(x, nn.Parameter):
                counter["n"] += 1
            return fn(x, *args, **kwargs)

        return call

    def kernels(kernel: str, device_type: str = "cpu") -> Kernels:
        k = real_kernels(kernel, device_type)
        return Kernels(counted(k.lsq), counted(k.double_round))

    monkeypatch.setattr(quantizers, "kernels", kernels)
    monkeypatch.setattr(quantizers, "floor_nest_fake", counted(real_floor))
    return counter


def _uncached(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eval forward with grad enabled (never cached)."""
    with torch.enable_grad():
        return model(x).detach()


def _cached(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("weight_mode", ["double_round", "floor", "unshared"])
def test_second_eval_forward_reuses_the_cache(calls: dict[str, int], weight_mode: str) -> None:
    model, x = _model(weight_mode=weight_mode)
    calls["n"] = 0
    first = _cached(model, x)
    assert calls["n"] == N_LAYERS
    second = _cached(model, x)
    with torch.inference_mode():
        third = model(x)
    assert calls["n"] == N_LAYERS  # no kernel call after the first forward
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(first, _uncached(model, x))  # cached output == uncached output
    assert calls["n"] == 2 * N_LAYERS  # the grad-enabled forward computed every weight again


def test_training_mode_and_grad_never_use_the_cache(calls: dict[str, int]) -> None:
    model, x = _model()
    _cached(model, x)
    calls["n"] = 0
    _uncached(model, x)
    _uncached(model, x)
    assert calls["n"] == 2 * N_LAYERS
    model.train()
    assert all(not q._cache for q in _quantizers(model))  # train() drops the cache
    with torch.no_grad():
        model(x)
        model(x)
    assert calls["n"] == 4 * N_LAYERS
    assert all(not q._cache for q in _quantizers(model))


def test_switching_bits_uses_the_entry_of_each_bit(calls: dict[str, int]) -> None:
    model, x = _model()
    refs = {b: _uncached(dbq.set_bits(model, b), x) for b in BITS}
    mixed = {"c1": 2, "c2": 8, "c3": 4, "fc": 6}
    ref_mixed = _uncached(dbq.set_bits(model, mixed), x)
    calls["n"] = 0
    for b in BITS:
        assert torch.equal(_cached(dbq.set_bits(model, b), x), refs[b])
    assert calls["n"] == len(BITS) * N_LAYERS
    for b in reversed(BITS):  # every bit is cached now: no new call
        assert torch.equal(_cached(dbq.set_bits(model, b), x), refs[b])
    assert torch.equal(_cached(dbq.set_bits(model, mixed), x), ref_mixed)
    assert calls["n"] == len(BITS) * N_LAYERS
    # memory bound: one entry per candidate bit per layer
    assert all(sorted(q._cache) == sorted(BITS) for q in _quantizers(model))


def test_in_place_weight_change_invalidates_only_that_layer(calls: dict[str, int]) -> None:
    model, x = _model()
    for b in (8, 2):
        _cached(dbq.set_bits(model, b), x)
    before = _cached(model, x)
    calls["n"] = 0
    with torch.no_grad():
        model.c2.weight.add_(0.05)
    out = _cached(model, x)
    assert calls["n"] == 1  # only c2 recomputed
    assert not torch.equal(out, before)
    assert torch.equal(out, _uncached(model, x))
    assert sorted(model.c2.weight_quant._cache) == [2]  # the stale 8-bit entry was dropped at once
    assert sorted(model.c1.weight_quant._cache) == [2, 8]


@pytest.mark.parametrize("which", ["scale", "scale_ref"])
def test_scale_change_invalidates(calls: dict[str, int], which: str) -> None:
    model, x = _model()
    dbq.set_bits(model, 4)
    before = _cached(model, x)
    with torch.no_grad():
        getattr(model.c3.weight_quant, which).mul_(1.7)
    calls["n"] = 0
    out = _cached(model, x)
    assert calls["n"] == 1
    assert not torch.equal(out, before) and torch.equal(out, _uncached(model, x))


def test_unshared_scale_of_another_bit_invalidates(calls: dict[str, int]) -> None:
    model, x = _model(weight_mode="unshared")
    dbq.set_bits(model, 4)
    _cached(model, x)
    with torch.no_grad():
        model.c1.weight_quant.scales["2"].mul_(2.0)
    calls["n"] = 0
    _cached(model, x)
    assert calls["n"] == 1  # conservative: any scale of the layer changes -> recompute


def test_optimizer_step_invalidates(calls: dict[str, int]) -> None:
    model, x = _model()
    before = _cached(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()  # eval mode, grad enabled: no cache involved
    opt.step()
    calls["n"] = 0
    out = _cached(model, x)
    assert calls["n"] == N_LAYERS
    assert not torch.equal(out, before) and torch.equal(out, _uncached(model, x))


def test_load_state_dict_invalidates() -> None:
    model, x = _model(seed=0)
    other, _ = _model(seed=1)
    _cached(model, x)
    model.load_state_dict(other.state_dict())
    expect = _uncached(other, x)
    assert torch.equal(_cached(model, x), expect)


def test_new_parameter_object_and_dtype_change_invalidate() -> None:
    model, x = _model()
    _cached(model, x)
    model.fc.weight = nn.Parameter(model.fc.weight.detach() * 1.3)  # same values would reuse no stale id
    assert torch.equal(_cached(model, x), _uncached(model, x))
    model.double()
    out = _cached(model, x.double())
    assert out.dtype == torch.float64
    assert torch.equal(out, _uncached(model, x.double()))


def test_kernel_switch_invalidates(calls: dict[str, int]) -> None:
    model, x = _model()
    ref = _cached(model, x)
    calls["n"] = 0
    dbq.set_kernel(model, "eager")
    assert torch.equal(_cached(model, x), ref)  # same values from every back-end
    assert calls["n"] == N_LAYERS


def test_disabled_quantizer_bypasses_the_cache() -> None:
    model, x = _model()
    _cached(model, x)
    with dbq.quant_enabled(model, False):
        fp = _cached(model, x)
        assert torch.equal(fp, _uncached(model, x))
    assert torch.equal(_cached(model, x), _uncached(model, x))
    assert not torch.equal(fp, _cached(model, x))


def test_cache_is_not_copied_or_pickled() -> None:
    model, x = _model()
    _cached(model, x)
    assert all(q._cache for q in _quantizers(model))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(not q._cache and q._cache_state is None for q in _quantizers(clone))
        assert torch.equal(_cached(clone, x), _cached(model, x))
    assert not any("_cache" in k for k in model.state_dict())


def test_jit_trace_does_not_bake_the_cached_weight() -> None:
    model, x = _model()
    _cached(model, x)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        model.c2.weight.mul_(0.5)
        assert torch.equal(traced(x), model(x))
