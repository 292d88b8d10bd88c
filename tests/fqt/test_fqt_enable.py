"""enable_grad_quant on prepared models: which layers, exactness at 16 bits, pickling, the no-grad path, and a
tiny end-to-end multi-precision training with AGP 4-bit keep-25% gradients (one average bit per element)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dbq as dbq
from lightning_dbq.fqt import GradQuantConfig, LayerGradQuant, enable_grad_quant, grad_quant_config
from tests.helpers.tiny import TinyNet


def _model(seed: int = 0, bits=(8, 4)) -> nn.Module:
    torch.manual_seed(seed)
    model = dbq.prepare(TinyNet(num_classes=4, width=8), list(bits))
    model(torch.randn(16, 3, 8, 8))  # initialise the activation scales
    return model


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_enable_sets_every_quantized_layer_and_none_clears() -> None:
    model = _model()
    names = enable_grad_quant(model, {"bits": 4, "method": "agp", "keep": 0.25})
    assert names == ["conv2", "conv3"]  # conv1 and fc are the FP first/last layers: exact gradients
    assert "grad_quant" not in model.conv1.__dict__ and "grad_quant" not in model.fc.__dict__
    assert grad_quant_config(model) == GradQuantConfig(bits=4, method="agp", keep=0.25)
    assert model.conv2.grad_quant.index != model.conv3.grad_quant.index  # one generator stream per layer
    assert "grad_quant" not in "".join(model.state_dict())  # nothing in the state dict
    assert enable_grad_quant(model, None) == []
    assert model.conv2.grad_quant is None and grad_quant_config(model) is None
    with pytest.raises(ValueError, match="call lightning_dbq.prepare first"):
        enable_grad_quant(TinyNet(), GradQuantConfig())
    with pytest.raises(ValueError, match="GradQuantConfig.method: got 'x'"):
        enable_grad_quant(model, {"method": "x"})


def test_sixteen_bit_gradients_reproduce_the_exact_model_gradients() -> None:
    model = _model()
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    dbq.set_bits(model, 4)
    exact = _grads(model, x, y)
    enable_grad_quant(model, GradQuantConfig(bits=16))
    got = _grads(model, x, y)
    weights = [n for n in exact if n.endswith("weight") and "bn" not in n]
    for n in weights:
        assert float((got[n] - exact[n]).norm() / exact[n].norm()) < 1e-4, n
    enable_grad_quant(model, GradQuantConfig(bits=2))
    low = _grads(model, x, y)
    assert float((low["conv2.weight"] - exact["conv2.weight"]).norm() / exact["conv2.weight"].norm()) > 1e-2
    assert torch.equal(low["fc.weight"], exact["fc.weight"])  # the last layer is FP and sees the exact gY


def test_no_grad_forward_takes_the_plain_path_and_outputs_match() -> None:
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    enable_grad_quant(model, GradQuantConfig(bits=4, method="psq"))
    calls = []
    hook = model.conv2.grad_quant
    model.conv2.__dict__["grad_quant"] = lambda *a: calls.append(1) or hook(*a)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert calls == []
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # grad-enabled forward: same values, via the hook
    assert calls == [1]


def test_pickle_and_deepcopy_keep_the_config_and_the_generator_state() -> None:
    model = _model()
    enable_grad_quant(model, GradQuantConfig(bits=3, seed=7))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    _grads(model, x, y)  # advance the generators
    clone, restored = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    a, b, c = _grads(model, x, y), _grads(clone, x, y), _grads(restored, x, y)
    assert isinstance(restored.conv2.grad_quant, LayerGradQuant)
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
    enable_grad_quant(model, GradQuantConfig(bits=3, seed=7))  # re-enabling resets the streams
    assert not torch.equal(_grads(model, x, y)["conv2.weight"], a["conv2.weight"])


def test_other_conv_padding_modes_and_same_padding() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 4, padding="same", padding_mode="reflect"),
                        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Conv1d(4, 2, 1))  # fmt: skip
    net = nn.Sequential(net[0], net[1], net[2], nn.Flatten(2), net[3])
    model = dbq.prepare(net, [8], quantize_first=True, quantize_last=True)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    exact = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()], allow_unused=True)
    assert len(enable_grad_quant(model, GradQuantConfig(bits=16))) == 4
    got = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()], allow_unused=True)
    for e, g in zip(exact, got, strict=True):
        if e is not None and e.norm() > 0:
            assert float((g - e).norm() / e.norm()) < 1e-3
    x1 = torch.randn(3, 9, 9)  # an unbatched input through the quantized-gradient path
    torch.testing.assert_close(model[0](x1), model[0](x1[None])[0])


def _separable(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator()
    g.manual_seed(1234)  # the same 4 class prototypes for train and test
    protos = torch.randn(4, 3, 8, 8, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return protos[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g), y


@pytest.mark.parametrize("seed", [0, 1])
def test_agp_one_average_bit_gradients_still_train_every_bit(seed: int, report) -> None:
    """Multi-precision {8, 4} training (per-bit steps) with AGP 4-bit keep-25% gradients learns a 4-class task."""
    model = _model(seed)
    assert enable_grad_quant(model, GradQuantConfig(bits=4, method="agp", keep=0.25, seed=seed)) == ["conv2", "conv3"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = _separable(100 + seed, 256)
    for step in range(60):
        x, y = _separable(seed * 1000 + step, 32)
        for bits in (8, 4):
            dbq.set_bits(model, bits)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    accs = {}
    with torch.no_grad():
        for bits in (8, 4):
            dbq.set_bits(model, bits)
            accs[bits] = float((model(xt).argmax(1) == yt).float().mean())
    assert min(accs.values()) > 0.85, accs  # chance is 0.25
    report(f"FQT AGP-4 keep 25% toy training seed {seed}: " + ", ".join(f"w{b}a{b} {a:.3f}" for b, a in accs.items()))
