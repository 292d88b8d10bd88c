"""Any ImageFolder tree (``root/<class>/<image>``), e.g. the CIFAR-10 training JPEGs, with a seeded split."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.io import ImageReadMode, decode_image, read_file

from lightning_dbq.data._base import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Batch,
    ImageTransform,
    SplitDataModule,
    TensorImageDataset,
    check_int,
    resize_center_crop,
)

__all__ = ["ImageFolderDataModule", "decode_rgb"]


def decode_rgb(path: str) -> Tensor:
    """Decode an image file to a ``(3, H, W)`` uint8 RGB tensor (torchvision's decoder, PIL as fallback)."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def _check_dir(name: str, path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}: no such directory {path!r} (expected an ImageFolder tree root/<class>/*)")
    try:
        find_classes(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: no class folders found in {path!r} ({err})") from err
    return path


class _FileImageDataset(Dataset[Batch]):
    """Decodes ``samples[indices[i]]`` from disk on every access."""

    def __init__(self, samples: list[tuple[str, int]], indices: Sequence[int], transform: ImageTransform) -> None:
        self.samples = samples
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        path, target = self.samples[self.indices[i]]
        return self.transform(decode_rgb(path)), torch.tensor(target, dtype=torch.int64)


class ImageFolderDataModule(SplitDataModule):
    """A torchvision ``ImageFolder`` tree, split into train / val by a seeded per-class permutation.

    For the CIFAR-10 JPEG tree, ``val_per_class=500`` gives a fixed 5,000-image validation split (the same for a
    given ``seed`` on every machine: indices refer to ``ImageFolder(root).samples``, sorted by class then file).
    Training images get ``RandomCrop(image_size, padding=4)`` + horizontal flip when ``augment``; validation,
    test and calibration images only ``ToTensor`` + ``Normalize``. Images whose size differs from ``image_size``
    are first resized (shorter side, bilinear, antialiased) and center-cropped.

    With ``cache_in_memory=True`` the used images (train subset + val) are decoded once, resized to
    ``image_size`` and kept as one uint8 tensor (CIFAR-10: 150 MB, a few seconds to decode); epochs then never
    touch the disk or the JPEG decoder. Without it, each access decodes the file (use ``num_workers``).

    Args:
        root: ImageFolder root of the training pool (train and val are split from it).
        batch_size: Batch size of every loader.
        val_per_class: Exact number of images per class held out; takes precedence over ``val_fraction``.
        val_fraction: Fraction of each class held out when ``val_per_class`` is ``None``.
        image_size: Side of the square model input.
        augment: Random crop (padding 4) + horizontal flip on training images.
        train_subset: Keep only this many training images (per-class balanced, seeded).
        test_root: Optional separate ImageFolder tree for ``test_dataloader`` (same class folders); default:
            test on the validation split.
        mean: Normalisation mean (default: CIFAR-10's).
        std: Normalisation std (default: CIFAR-10's).
        cache_in_memory: Decode the images once into memory.
        num_workers: DataLoader worker processes.
        seed: Seed of the split, the subsets and the shuffling.
        pin_memory: DataLoader ``pin_memory``.
        drop_last: Drop the last incomplete training batch.

    Raises:
        FileNotFoundError: If ``root`` (or ``test_root``) is missing or has no class folders.
        ValueError: For an out-of-range argument (the message names it).

    Example:
        >>> dm = ImageFolderDataModule("../shared/data/cifar10/train", val_per_class=500)  # doctest: +SKIP
        >>> dm.num_classes, len(dm.split_indices().val)  # doctest: +SKIP
        (10, 5000)
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        val_per_class: int | None = None,
        val_fraction: float = 0.1,
        image_size: int = 32,
        augment: bool = True,
        train_subset: int | None = None,
        test_root: str | None = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        cache_in_memory: bool = False,
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
        check_int("image_size", image_size, 1)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values (RGB), got mean={mean!r}, std={std!r}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.root = _check_dir("root", os.fspath(root))
        self.test_root = None if test_root is None else _check_dir("test_root", os.fspath(test_root))
        self.save_hyperparameters()
        self.classes = find_classes(self.root)[0]
        self.num_classes = len(self.classes)
        self.in_chans = 3
        self.image_size = image_size
        self.augment = augment
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.cache_in_memory = cache_in_memory
        self._folder: ImageFolder | None = None
        self._cache: tuple[Tensor, Tensor, dict[int, int]] | None = None

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image of the train pool, in ``ImageFolder`` order."""
        if self._folder is None:
            self._folder = ImageFolder(self.root)
        return self._folder.samples

    def _targets(self) -> Sequence[int]:
        if self._folder is None:
            self._folder = ImageFolder(self.root)
        return self._folder.targets

    def _transform(self, train: bool, resize: bool) -> ImageTransform:
        aug = train and self.augment
        size = self.image_size if resize else None
        return ImageTransform(self.mean, self.std, size=size, crop_padding=4 if aug else 0, flip=aug)

    def _decode_all(self, samples: list[tuple[str, int]], indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        images = torch.empty(len(indices), 3, self.image_size, self.image_size, dtype=torch.uint8)
        targets = torch.empty(len(indices), dtype=torch.int64)
        for row, idx in enumerate(indices):
            path, target = samples[idx]
            images[row] = resize_center_crop(decode_rgb(path), self.image_size)
            targets[row] = target
        return images, targets

    def _cached(self) -> tuple[Tensor, Tensor, dict[int, int]]:
        if self._cache is None:
            split = self.split_indices()
            used = sorted(set(split.train) | set(split.val))
            images, targets = self._decode_all(self.samples, used)
            self._cache = (images, targets, {idx: row for row, idx in enumerate(used)})
        return self._cache

    def _dataset(self, indices: Sequence[int], *, train: bool) -> Dataset[Batch]:
        if not self.cache_in_memory:
            return _FileImageDataset(self.samples, indices, self._transform(train, resize=True))
        images, targets, row_of = self._cached()
        rows = [row_of[idx] for idx in indices]
        return TensorImageDataset(images, targets, rows, self._transform(train, resize=False))

    def _test_dataset(self) -> Dataset[Batch] | None:
        if self.test_root is None:
            return None
        folder = ImageFolder(self.test_root)
        if folder.classes != self.classes:
            raise ValueError(
                f"test_root classes {folder.classes} differ from root classes {self.classes} "
                f"(test_root={self.test_root!r}, root={self.root!r})"
            )
        indices = range(len(folder.samples))
        if not self.cache_in_memory:
            return _FileImageDataset(folder.samples, indices, self._transform(False, resize=True))
        images, targets = self._decode_all(folder.samples, indices)
        return TensorImageDataset(images, targets, indices, self._transform(False, resize=False))
