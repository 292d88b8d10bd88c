"""Small timm-registered models; importing this package registers them with timm.

Example:
    >>> import timm
    >>> import lightning_dbq.models
    >>> timm.create_model("cifar_resnet20", num_classes=10).pretrained_cfg["first_conv"]
    'conv1'
"""

from lightning_dbq.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet56,
)

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]
