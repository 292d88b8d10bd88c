"""prepare()/set_bits() on real timm models and on plain modules; the error messages of bad input."""

from __future__ import annotations

import copy
import pickle
from functools import partial

import pytest
import timm
import torch
from timm.layers import GroupNormAct
from timm.models.resnetv2 import ResNetV2
from torch import nn

import lightning_dbq as dbq
from lightning_dbq.quant.layers import is_quant_layer
from lightning_dbq.quant.norm import PerBitNorm
from lightning_dbq.quant.prepare import first_last_layers

BITS = (8, 6, 4, 2)

MODELS = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=10), (2, 3, 64, 64)),
    "mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100", num_classes=10), (2, 3, 64, 64)),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (2, 3, 64, 64)),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), (1, 3, 224, 224)),
    # Conv2dSame (TF "SAME" padding) everywhere
    "tf_mobilenetv3_small_minimal_100": (
        lambda: timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=10),
        (2, 3, 64, 64),
    ),
    # StdConv2d (weight standardisation) everywhere; built from the class, so no pretrained_cfg (fallback rule)
    "resnetv2_stdconv": (
        lambda: ResNetV2(
            layers=[1, 1, 1, 1],
            channels=(64, 128, 256, 512),
            stem_chs=16,
            num_classes=10,
            norm_layer=partial(GroupNormAct, num_groups=8),
        ),  # fmt: skip
        (2, 3, 64, 64),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_prepare_timm_models(name: str, report) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    first, last = first_last_layers(model)
    originals = {n: (type(model.get_submodule(n)), model.get_submodule(n).weight.clone()) for n in first | last}
    types_before = {n: type(m) for n, m in model.named_modules()}
    dbq.prepare(model, bits=BITS)
    layers = dbq.quantized_layers(model)
    assert layers, "nothing was quantized"
    report(f"prepare({name}): {len(layers)} quantized layers, first={sorted(first)} last={sorted(last)} kept FP")
    # first/last untouched: same class, same weights, no quantizer
    for n, (cls, w) in originals.items():
        m = model.get_submodule(n)
        assert type(m) is cls and not is_quant_layer(m) and torch.equal(m.weight, w)
    # every quantized layer keeps its original class as a base (its own forward semantics)
    for info in layers:
        m = model.get_submodule(info.name)
        assert isinstance(m, types_before[info.name]) and info.bits == BITS
        assert info.params == m.weight.numel()
    # with quantization disabled the output equals the original model's exactly (tolerance 0)
    with torch.no_grad(), dbq.quant_enabled(model, False):
        assert torch.equal(model(x), ref)
    # a forward at every candidate bit runs and differs between bits
    model.train()
    model(x)  # initialise activation scales from a batch
    model.eval()
    outs = {}
    with torch.no_grad():
        for b in BITS:
            dbq.set_bits(model, b)
            assert set(dbq.bit_config(model).values()) == {b}
            outs[b] = model(x)
            assert torch.isfinite(outs[b]).all()
    assert not torch.equal(outs[8], outs[2])  # the bit switch changes the computation


def test_prepare_is_idempotent_and_rejects_a_different_spec() -> None:
    model = timm.create_model("resnet18", num_classes=10)
    dbq.prepare(model, bits=[8, 4, 2])
    n_params = sum(p.numel() for p in model.parameters())
    assert dbq.prepare(model, bits=[2, 4, 8]) is model  # same spec, any order
    assert sum(p.numel() for p in model.parameters()) == n_params
    with pytest.raises(ValueError, match="already prepared"):
        dbq.prepare(model, bits=[8, 4])


def test_options_quantize_first_last_and_skip() -> None:
    model = timm.create_model("resnet18", num_classes=10)
    dbq.prepare(model, bits=[8, 4], quantize_first=True, quantize_last=True, skip=["*.downsample.*"])
    names = {i.name for i in dbq.quantized_layers(model)}
    assert {"conv1", "fc"} <= names
    assert not any("downsample" in n for n in names)


def test_tuple_first_conv_and_classifier_are_respected() -> None:
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32)
    assert isinstance(model.pretrained_cfg["classifier"], tuple)
    dbq.prepare(model, bits=[8, 4])
    names = {i.name for i in dbq.quantized_layers(model)}
    assert "head" not in names and "head_dist" not in names and "patch_embed.proj" not in names


def test_per_bit_norms_follow_owner_layer_and_mixed_config() -> None:
    model = timm.create_model("resnet18", num_classes=10)
    dbq.prepare(model, bits=BITS)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, PerBitNorm)}
    assert "layer1.0.bn1" in norms and norms["layer1.0.bn1"].owner == "layer1.0.conv1"
    assert "bn1" not in norms  # follows the FP stem: its statistics do not depend on bits
    dbq.set_bits(model, 6)
    dbq.set_bits(model, {"layer1.0.conv1": 2})
    cfg = dbq.bit_config(model)
    assert cfg["layer1.0.conv1"] == 2 and cfg["layer1.0.conv2"] == 6
    assert norms["layer1.0.bn1"].active_bits == 2 and norms["layer1.0.bn2"].active_bits == 6


def test_plain_module_with_depthwise_and_deepcopy_pickle() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    dbq.prepare(model, bits=[8, 4, 2])
    assert [i.name for i in dbq.quantized_layers(model)] == ["3", "6"]
    x = torch.randn(2, 3, 8, 8)
    model(x)
    model.eval()
    dbq.set_bits(model, 2)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
        assert dbq.bit_config(clone) == dbq.bit_config(model)
    assert list(model.state_dict())[:2] == ["0.weight", "0.bias"]
    assert "3.weight" in model.state_dict() and "3.weight_quant.scale" in model.state_dict()


def test_gradients_reach_weights_and_scales() -> None:
    model = dbq.prepare(timm.create_model("resnet18", num_classes=4), bits=[8, 2])
    dbq.set_bits(model, 2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    conv = model.get_submodule("layer2.0.conv1")
    assert conv.weight.grad is not None and conv.weight_quant.scale.grad is not None
    assert conv.act_quant.scales["2"].grad is not None and conv.act_quant.scales["8"].grad is None


@pytest.mark.parametrize(
    ("bits", "exc", "match"),
    [
        ([9, 4], ValueError, r"values must be in \[2, 8\], got 9"),
        ([8, 1], ValueError, r"values must be in \[2, 8\], got 1"),
        ([8, 8, 4], ValueError, r"must not contain duplicates, got \[8\]"),
        ([], ValueError, "must not be empty"),
        ([8, 4.0], TypeError, "must contain integers, got 4.0"),
        (["8"], TypeError, "must contain integers, got '8'"),
        ([True, 4], TypeError, "must contain integers, got True"),
        (8, TypeError, "must be a list of integers"),
    ],
)
def test_bad_bits_give_clear_errors(bits, exc, match) -> None:
    with pytest.raises(exc, match=match):
        dbq.prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)), bits=bits)


def test_set_bits_errors() -> None:
    model = dbq.prepare(timm.create_model("resnet18", num_classes=4), bits=[8, 4, 2])
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['layer9.conv'\]"):
        dbq.set_bits(model, {"layer9.conv": 4})
    with pytest.raises(ValueError, match=r"must be one of the candidate bits \[8, 4, 2\], got 6"):
        dbq.set_bits(model, 6)
    with pytest.raises(ValueError, match=r"'layer1.0.conv1' must be one of the candidate bits \[8, 4, 2\], got 3"):
        dbq.set_bits(model, {"layer1.0.conv1": 3})
    with pytest.raises(ValueError, match="not prepared"):
        dbq.set_bits(timm.create_model("resnet18", num_classes=4), 4)
    with pytest.raises(ValueError, match="no quantizable layer"):
        dbq.prepare(nn.Sequential(nn.Linear(4, 4)), bits=[8, 4])
