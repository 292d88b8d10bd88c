"""A learnable synthetic image task for fast tests: class prototypes + Gaussian noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import Unpack

from lightning_dbq.data._base import Batch, SplitArgs, SplitDataModule, TensorImageDataset, check_int

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(SplitDataModule):
    """``num_samples`` images ``x = prototype[y] + noise · ε`` with fixed, smooth random class prototypes.

    Each class prototype is a seeded ``N(0, 1)`` image of side ``image_size // 4`` upsampled (bilinear) to
    ``image_size`` and standardised, so a small CNN separates the classes within a few dozen steps while
    ``noise`` keeps the task from being trivial. Labels are balanced (``i % num_classes``); the data, the split and
    the shuffling are all derived from ``seed``. Samples are already roughly zero-mean / unit-variance, so no
    normalisation is applied. The test split is the validation split.

    Args:
        num_samples: Total samples (train + val).
        num_classes: Number of classes.
        image_size: Side of the square images.
        in_chans: Image channels.
        noise: Std of the per-pixel Gaussian noise added to the prototype.
        **kwargs: The shared :class:`~lightning_dbq.data.SplitArgs`; here ``batch_size`` defaults to 32 and
            ``val_fraction`` to 0.25, and ``seed`` also seeds the data itself.

    Raises:
        ValueError: For an out-of-range argument (the message names it).

    Example:
        >>> dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8)
        >>> x, y = dm.calibration_batches(num_images=8)[0]
        >>> tuple(x.shape), y.dtype
        ((8, 3, 8, 8), torch.int64)
    """

    split_defaults: ClassVar[SplitArgs] = {"batch_size": 32, "val_fraction": 0.25}

    def __init__(
        self,
        num_samples: int = 512,
        num_classes: int = 4,
        image_size: int = 16,
        in_chans: int = 3,
        noise: float = 0.5,
        **kwargs: Unpack[SplitArgs],
    ) -> None:
        super().__init__(**self.split_kwargs(**kwargs))
        check_int("num_classes", num_classes, 2)
        check_int("num_samples", num_samples, 2 * num_classes)
        check_int("image_size", image_size, 4)
        check_int("in_chans", in_chans, 1)
        if not noise >= 0.0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_chans = in_chans
        self.noise = noise
        self._data: tuple[Tensor, Tensor] | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Identity normalisation (``mean`` 0, ``std`` 1 per channel), ``image_size``, ``in_chans`` channels,
        ``"none"``: the images are generated at ``image_size`` and never resized. Available right after
        ``__init__``."""
        return self._preprocessing([0.0] * self.in_chans, [1.0] * self.in_chans, "none")

    @property
    def class_names(self) -> list[str]:
        """``"class_0"`` … ``"class_{num_classes-1}"``. Available right after ``__init__``."""
        return [f"class_{i}" for i in range(self.num_classes)]

    def _load(self) -> tuple[Tensor, Tensor]:
        if self._data is None:
            gen = torch.Generator().manual_seed(self.seed)
            low = max(1, self.image_size // 4)
            protos = torch.randn(self.num_classes, self.in_chans, low, low, generator=gen)
            size = (self.image_size, self.image_size)
            protos = F.interpolate(protos, size=size, mode="bilinear", align_corners=False)
            flat = protos.flatten(1)
            protos = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)).view_as(protos)
            labels = torch.arange(self.num_samples) % self.num_classes
            eps = torch.randn(self.num_samples, self.in_chans, *size, generator=gen)
            self._data = (protos[labels] + self.noise * eps, labels)
        return self._data

    def _targets(self) -> Sequence[int]:
        return self._load()[1].tolist()

    def _dataset(self, indices: Sequence[int], *, train: bool) -> Dataset[Batch]:
        images, labels = self._load()
        return TensorImageDataset(images, labels, indices)
