"""Tests for the timm-registered CIFAR ResNets."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
import timm
import torch
from torch import nn

import lightning_dbq.models
from lightning_dbq.models import CifarResNet, cifar_resnet20, cifar_resnet56

NAMES = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]


def _create(name: str, **kwargs: Any) -> CifarResNet:
    return cast(CifarResNet, timm.create_model(name, **kwargs))


def test_registered_with_timm() -> None:
    assert timm.list_models("cifar_resnet*") == NAMES
    assert set(NAMES) <= set(lightning_dbq.models.__all__)


@pytest.mark.parametrize(
    ("name", "approx_millions", "exact"),
    [("cifar_resnet20", 0.27, 272_474), ("cifar_resnet32", 0.46, 466_906), ("cifar_resnet56", 0.85, 855_770)],
)
def test_param_count(name: str, approx_millions: float, exact: int) -> None:
    model = timm.create_model(name, num_classes=10, in_chans=3)
    count = sum(p.numel() for p in model.parameters())
    assert count / 1e6 == pytest.approx(approx_millions, rel=0.02)
    assert count == exact


@pytest.mark.parametrize(("in_chans", "num_classes", "size"), [(3, 10, 32), (1, 100, 32), (3, 7, 16)])
def test_forward_shape(in_chans: int, num_classes: int, size: int) -> None:
    model = _create("cifar_resnet20", num_classes=num_classes, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    assert model(x).shape == (2, num_classes)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, size // 4, size // 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert torch.equal(model.forward_head(feats), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_names_resolve(name: str) -> None:
    model = _create(name, num_classes=5, in_chans=1)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d)
    assert first.in_channels == 1
    classifier = model.get_submodule(cfg["classifier"])
    assert isinstance(classifier, nn.Linear)
    assert classifier.out_features == 5
    assert model.get_classifier() is classifier


def test_pretrained_true_raises_and_false_is_accepted() -> None:
    with pytest.raises(ValueError, match="pretrained=True is not supported for 'cifar_resnet20'"):
        timm.create_model("cifar_resnet20", pretrained=True)
    assert isinstance(cifar_resnet20(pretrained=False), CifarResNet)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 21}, "depth must be 6n"),
        ({"depth": 2}, "depth must be 6n"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
        ({"in_chans": 0}, "in_chans must be >= 1"),
        ({"global_pool": "max"}, "global_pool must be 'avg'"),
        ({"drop_rate": 1.0}, "drop_rate must be in"),
    ],
)
def test_bad_args(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CifarResNet(**kwargs)  # type: ignore[arg-type]


def test_depth_gives_blocks_per_stage() -> None:
    model = CifarResNet(depth=32)
    assert model.pretrained_cfg["architecture"] == "cifar_resnet32"  # cfg also without the timm factory
    assert model.pretrained_cfg["first_conv"] == "conv1"
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    strides = [model.layer1[0].conv1.stride, model.layer2[0].conv1.stride, model.layer3[0].conv1.stride]
    assert strides == [(1, 1), (2, 2), (2, 2)]
    assert model.layer1[0].downsample is None
    assert model.layer2[0].downsample is not None
    assert model.layer2[1].downsample is None


def test_plain_layers_and_bn_follows_its_conv() -> None:
    model = cifar_resnet20()
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout)
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    assert all(type(m) in allowed for _, m in leaves), [type(m) for _, m in leaves]
    layers = [(n, m) for n, m in leaves if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    convs = [i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 9 + 2  # stem + 2 per block + 2 downsample convs
    for i in convs:
        conv_name, conv = layers[i]
        bn_name, bn = layers[i + 1]
        assert isinstance(bn, nn.BatchNorm2d), (conv_name, bn_name)
        assert bn.num_features == conv.out_channels
        assert conv.bias is None
        assert bn_name.rpartition(".")[0] == conv_name.rpartition(".")[0]
    names = [n for n, _ in layers]
    assert names[:3] == ["conv1", "bn1", "layer1.0.conv1"]
    assert "layer2.0.downsample.0" in names
    assert names.index("layer2.0.downsample.1") == names.index("layer2.0.downsample.0") + 1
    assert names[-1] == "fc"


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = cifar_resnet56()
    conv = model.layer3[4].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    assert torch.all(model.bn1.weight == 1)
    assert torch.all(model.bn1.bias == 0)
    zero_init = CifarResNet(depth=20, zero_init_last=True)
    assert torch.all(zero_init.get_parameter("layer1.0.bn2.weight") == 0)


def test_reset_classifier() -> None:
    model = cifar_resnet20(num_classes=10)
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        model.reset_classifier(10, global_pool="")


def test_features_only() -> None:
    model = timm.create_model("cifar_resnet20", features_only=True)
    feats = model(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [16, 16, 32, 64]
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8]


def test_grad_checkpointing_matches() -> None:
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


def test_deepcopy_and_state_dict_roundtrip() -> None:
    model = cifar_resnet20().eval()
    clone = copy.deepcopy(model)
    fresh = cifar_resnet20().eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x))
    assert torch.equal(fresh(x), model(x))


def test_sgd_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=4)
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters())
