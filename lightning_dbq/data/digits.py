"""scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes): the embedded, download-free default."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_dbq.data._base import Batch, ImageTransform, SplitDataModule, TensorImageDataset, check_int

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """``sklearn.datasets.load_digits()`` as upsampled, normalised image tensors held in memory.

    Pixels (0..16) are scaled to [0, 1], upsampled to ``image_size`` with bilinear interpolation and replicated to
    ``in_chans`` channels. Normalisation uses one mean and one std (shared by all channels) computed on the
    **train split** after upsampling, so they depend on ``seed`` / ``val_fraction`` and are available as
    :attr:`mean` / :attr:`std` once the data is loaded (after ``setup`` or ``split_indices``). The validation split
    is stratified per class; the test split is the validation split.

    Args:
        batch_size: Batch size of every loader.
        image_size: Side of the (square) upsampled image.
        in_chans: 1 (grey) or 3 (grey replicated to RGB).
        val_fraction: Fraction of each class held out for validation.
        val_per_class: Exact number of images per class held out; takes precedence over ``val_fraction``.
        train_subset: Keep only this many training images (per-class balanced, seeded).
        augment: Random shift of the training images (zero-padded random crop, ``image_size // 8`` pixels).
        num_workers: DataLoader worker processes (0 is fastest: the data is in memory).
        seed: Seed of the split, the subsets and the shuffling.
        pin_memory: DataLoader ``pin_memory``.
        drop_last: Drop the last incomplete training batch.

    Raises:
        ValueError: For an out-of-range argument (the message names it).

    Example:
        >>> dm = DigitsDataModule(batch_size=16)
        >>> dm.num_classes, dm.in_chans, dm.image_size
        (10, 3, 32)
    """

    def __init__(
        self,
        batch_size: int = 128,
        image_size: int = 32,
        in_chans: int = 3,
        val_fraction: float = 0.2,
        val_per_class: int | None = None,
        train_subset: int | None = None,
        augment: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pin_memory=pin_memory,
            drop_last=drop_last,
            val_fraction=val_fraction,
            val_per_class=val_per_class,
            train_subset=train_subset,
        )
        check_int("image_size", image_size, 8)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
        self.save_hyperparameters()
        self.num_classes = 10
        self.in_chans = in_chans
        self.image_size = image_size
        self.augment = augment
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._images: Tensor | None = None
        self._labels: Tensor | None = None

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
        return TensorImageDataset(images, labels, indices, ImageTransform(mean, std, crop_padding=padding))
