"""scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes): the embedded, download-free default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import Unpack

from lightning_dbq.data._base import (
    Batch,
    SplitArgs,
    SplitDataModule,
    TensorImageDataset,
    check_int,
    image_transform,
)

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """``sklearn.datasets.load_digits()`` as upsampled, normalised image tensors held in memory.

    Pixels (0..16) are scaled to [0, 1], upsampled to ``image_size`` with bilinear interpolation and replicated to
    ``in_chans`` channels. Normalisation uses one mean and one std (shared by all channels) computed on the
    **train split** after upsampling, so they depend on ``seed`` / ``val_fraction`` and are available as
    :attr:`mean` / :attr:`std` once the data is loaded (after ``setup`` or ``split_indices``). The validation split
    is stratified per class; the test split is the validation split.

    Args:
        image_size: Side of the (square) upsampled image.
        in_chans: 1 (grey) or 3 (grey replicated to RGB).
        augment: Random shift of the training images (zero-padded random crop, ``image_size // 8`` pixels).
        **kwargs: The shared :class:`~lightning_dbq.data.SplitArgs` (``batch_size``, ``seed``, ...); here
            ``val_fraction`` defaults to 0.2 and ``num_workers`` is best left at 0 (the data is in memory).

    Raises:
        ValueError: For an out-of-range argument (the message names it).

    Example:
        >>> dm = DigitsDataModule(batch_size=16)
        >>> dm.num_classes, dm.in_chans, dm.image_size
        (10, 3, 32)
    """

    split_defaults: ClassVar[SplitArgs] = {"val_fraction": 0.2}

    def __init__(
        self, image_size: int = 32, in_chans: int = 3, augment: bool = False, **kwargs: Unpack[SplitArgs]
    ) -> None:
        super().__init__(**self.split_kwargs(**kwargs))
        check_int("image_size", image_size, 8)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
        self.num_classes = 10
        self.in_chans = in_chans
        self.image_size = image_size
        self.augment = augment
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._images: Tensor | None = None
        self._labels: Tensor | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The train-split ``mean`` / ``std`` (one value repeated per channel), ``image_size``, ``in_chans`` channels,
        ``"bilinear"`` (the 8×8 digits are upsampled bilinearly to ``image_size``).

        The statistics depend on the split, so the first access loads the data and computes them (what ``setup``
        does anyway). Serving inputs are the 8×8 digits as floats in ``[0, 1]`` (pixel / 16) or uint8 (0..255),
        repeated to ``in_chans`` channels.
        """
        mean, std = self._stats()
        return self._preprocessing(mean, std, "bilinear")

    @property
    def class_names(self) -> list[str]:
        """``"0"`` … ``"9"``. Available right after ``__init__``."""
        return [str(i) for i in range(self.num_classes)]

    def _load(self) -> tuple[Tensor, Tensor]:
        if self._images is None or self._labels is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
            self._images = images.expand(-1, self.in_chans, -1, -1).contiguous()
            self._labels = torch.as_tensor(digits.target, dtype=torch.int64)
        return self._images, self._labels

    def _targets(self) -> Sequence[int]:
        return self._load()[1].tolist()

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.mean is None or self.std is None:
            train = self._load()[0][self.split_indices().train]
            self.mean = (float(train.mean()),) * self.in_chans
            self.std = (float(train.std()),) * self.in_chans
        return self.mean, self.std

    def _dataset(self, indices: Sequence[int], *, train: bool) -> Dataset[Batch]:
        images, labels = self._load()
        mean, std = self._stats()
        padding = self.image_size // 8 if (train and self.augment) else 0
        transform = image_transform(mean, std, size=self.image_size, crop_padding=padding)
        return TensorImageDataset(images, labels, indices, transform)
