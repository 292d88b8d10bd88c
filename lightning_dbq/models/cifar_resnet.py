"""CIFAR ResNets (He et al., 2016) registered with timm: ``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet56``.

The architecture follows "Deep Residual Learning for Image Recognition", section 4.2: a 3×3 stem convolution with
16 channels, three stages of ``n = (depth - 2) / 6`` BasicBlocks with 16/32/64 channels (stride 2 at the first block
of stages 2 and 3), global average pooling and a linear classifier. Shortcuts that change shape use a 1×1
convolution + BatchNorm ("option B"), which adds ~2.7k parameters to the paper's parameter-free option A.

Every layer is a plain :class:`torch.nn.Conv2d`, :class:`torch.nn.BatchNorm2d` or :class:`torch.nn.Linear`, and each
BatchNorm is registered directly after the convolution it normalizes (``conv1, bn1, conv2, bn2, downsample.0,
downsample.1``) so that a quantizer can wrap the layers and pair convs with their norms by registration order.

Importing this module registers the models, after which ``timm.create_model("cifar_resnet20", num_classes=10)``
works like any timm model (``pretrained_cfg`` with ``first_conv="conv1"`` and ``classifier="fc"``,
``get_classifier``, ``reset_classifier``, ``forward_features``, ``forward_head``). No pretrained weights ship:
``pretrained=True`` raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_STAGE_CHANNELS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs with an identity or 1×1 conv-BN ("option B") shortcut.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first convolution (and of the shortcut convolution).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def zero_init_last(self) -> None:
        """Zero the last BatchNorm's weight so the block starts as (almost) an identity."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block (no in-place ops, so activation hooks and double backward are safe)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with the timm model interface.

    Args:
        depth: Network depth; ``(depth - 2)`` must be a positive multiple of 6 (20, 32, 44, 56, 110, ...).
        num_classes: Classifier outputs; ``0`` gives a feature extractor (``fc`` is an ``nn.Identity``).
        in_chans: Input image channels.
        global_pool: Only ``"avg"`` is supported (timm keyword, kept for API compatibility).
        drop_rate: Dropout before the classifier.
        zero_init_last: Zero-init the last BN weight of every block (off by default, as in the paper).

    Raises:
        ValueError: For an invalid ``depth``, ``num_classes``, ``in_chans``, ``global_pool`` or ``drop_rate``.

    Example:
        >>> model = CifarResNet(depth=20, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    pretrained_cfg: dict[str, Any]  # set by timm's build_model_with_cfg (the factories below)
    default_cfg: dict[str, Any]

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        _check_global_pool(global_pool)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = _STAGE_CHANNELS[-1]
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, _STAGE_CHANNELS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_CHANNELS[0])
        self.act1 = nn.ReLU()
        chs = _STAGE_CHANNELS
        self.layer1 = _make_stage(chs[0], chs[0], blocks_per_stage, stride=1)
        self.layer2 = _make_stage(chs[0], chs[1], blocks_per_stage, stride=2)
        self.layer3 = _make_stage(chs[1], chs[2], blocks_per_stage, stride=2)
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=chs[0], reduction=1, module="act1")]
        self.feature_info += [
            dict(num_chs=c, reduction=2**i, module=f"layer{i + 1}") for i, c in enumerate(_STAGE_CHANNELS)
        ]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)
        # Direct construction gets the same cfg as the timm factories (which overwrite it with timm's resolved one).
        self.pretrained_cfg = self.default_cfg = _cfg(architecture=f"cifar_resnet{depth}")

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    module.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-decay helpers (stem, then blocks)."""
        blocks = r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        return dict(stem=r"^conv1|bn1", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing of the residual blocks."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Return the classifier module (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace the classifier with a freshly initialised one (``num_classes=0`` → ``nn.Identity``).

        Args:
            num_classes: New number of classes.
            global_pool: Only ``"avg"`` is supported.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last stage's feature map, shape ``(N, 64, H / 4, W / 4)``."""
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint_sequential(stage, len(stage), x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, flatten, dropout and classify (or stop before ``fc`` when ``pre_logits``)."""
        x = self.head_drop(self.flatten(self.pool(x)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def _make_stage(in_chs: int, out_chs: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chs, out_chs, stride)]
    blocks += [BasicBlock(out_chs, out_chs, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _check_global_pool(global_pool: str) -> None:
    if global_pool != "avg":
        raise ValueError(f"global_pool must be 'avg' for CifarResNet, got {global_pool!r}")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"cifar_resnet20": _cfg(), "cifar_resnet32": _cfg(), "cifar_resnet56": _cfg()})


def _create_cifar_resnet(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    if pretrained:
        raise ValueError(
            f"pretrained=True is not supported for {variant!r}: lightning_dbq ships no pretrained weights. "
            "HINT: pass pretrained=False (the default), train the model and load your own checkpoint."
        )
    feature_cfg = dict(out_indices=(0, 1, 2, 3))
    model: CifarResNet = build_model_with_cfg(
        CifarResNet, variant, pretrained=False, feature_cfg=feature_cfg, depth=depth, **kwargs
    )
    return model


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, ~0.27M parameters at 10 classes).

    Args:
        pretrained: Must be ``False``; no weights ship.
        **kwargs: Forwarded to :class:`CifarResNet` (``num_classes``, ``in_chans``, ``drop_rate``, ...).
    """
    return _create_cifar_resnet("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage, ~0.47M parameters at 10 classes).

    Args:
        pretrained: Must be ``False``; no weights ship.
        **kwargs: Forwarded to :class:`CifarResNet`.
    """
    return _create_cifar_resnet("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage, ~0.86M parameters at 10 classes).

    Args:
        pretrained: Must be ``False``; no weights ship.
        **kwargs: Forwarded to :class:`CifarResNet`.
    """
    return _create_cifar_resnet("cifar_resnet56", 56, pretrained, **kwargs)
