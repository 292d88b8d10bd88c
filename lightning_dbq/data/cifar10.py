"""CIFAR-10 through ``torchvision.datasets.CIFAR10`` (the python pickle batches), held in memory as uint8."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

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

__all__ = ["CIFAR10DataModule"]

_FILES = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]


def _missing_files(root: str) -> list[str]:
    folder = os.path.join(root, CIFAR10.base_folder)
    return [name for name in _FILES if not os.path.isfile(os.path.join(folder, name))]


def _not_found(root: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"CIFAR-10 not found under root={root!r} ({detail}). HINT: pass download=True to download it "
        f"(needs internet), or point root at a folder containing {CIFAR10.base_folder}/. For the JPEG "
        "ImageFolder copy of the training set use ImageFolderDataModule instead."
    )


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 (torchvision): a seeded, stratified train/val split of the 50k training images.

    The whole split is decoded into one uint8 tensor (150 MB), so epochs are fast on CPU. Training images get
    ``RandomCrop(32, padding=4)`` + horizontal flip when ``augment``; val / test / calibration images only
    ``ToTensor`` + ``Normalize``. ``test_dataloader`` uses the official 10k test images when
    ``official_test=True`` (the default), else the validation split.

    Args:
        root: Folder that contains (or will receive) ``cifar-10-batches-py/``.
        download: Download the data in ``prepare_data`` if absent (needs internet).
        batch_size: Batch size of every loader.
        val_per_class: Exact number of images per class held out; takes precedence over ``val_fraction``.
        val_fraction: Fraction of each class held out when ``val_per_class`` is ``None``.
        image_size: Side of the model input (images are resized once at load time when it differs from 32).
        augment: Random crop (padding 4) + horizontal flip on training images.
        train_subset: Keep only this many training images (per-class balanced, seeded).
        official_test: Test on CIFAR-10's test set (``True``) or on the validation split (``False``).
        mean: Normalisation mean.
        std: Normalisation std.
        num_workers: DataLoader worker processes.
        seed: Seed of the split, the subsets and the shuffling.
        pin_memory: DataLoader ``pin_memory``.
        drop_last: Drop the last incomplete training batch.

    Raises:
        FileNotFoundError: If the data is absent and ``download=False`` (the message says to pass
            ``download=True``).
        ValueError: For an out-of-range argument (the message names it).
    """

    def __init__(
        self,
        root: str,
        download: bool = False,
        batch_size: int = 128,
        val_per_class: int | None = None,
        val_fraction: float = 0.1,
        image_size: int = 32,
        augment: bool = True,
        train_subset: int | None = None,
        official_test: bool = True,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
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
        self.root = os.fspath(root)
        self.download = download
        if not download:
            missing = _missing_files(self.root)
            if missing:
                raise _not_found(self.root, f"missing {', '.join(missing)}")
        self.save_hyperparameters()
        self.num_classes = 10
        self.in_chans = 3
        self.image_size = image_size
        self.augment = augment
        self.official_test = official_test
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._train_pool: tuple[Tensor, Tensor] | None = None

    def prepare_data(self) -> None:
        """Download CIFAR-10 when ``download=True`` (called on one process per node by Lightning)."""
        if self.download:
            CIFAR10(self.root, train=True, download=True)

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            dataset = CIFAR10(self.root, train=train, download=False)
        except RuntimeError as err:
            raise _not_found(self.root, str(err)) from err
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
        images = resize_center_crop(images, self.image_size).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def _pool(self) -> tuple[Tensor, Tensor]:
        if self._train_pool is None:
            self._train_pool = self._load(train=True)
        return self._train_pool

    def _targets(self) -> Sequence[int]:
        return self._pool()[1].tolist()

    def _transform(self, train: bool) -> ImageTransform:
        aug = train and self.augment
        return ImageTransform(self.mean, self.std, crop_padding=4 if aug else 0, flip=aug)

    def _dataset(self, indices: Sequence[int], *, train: bool) -> Dataset[Batch]:
        images, targets = self._pool()
        return TensorImageDataset(images, targets, indices, self._transform(train))

    def _test_dataset(self) -> Dataset[Batch] | None:
        if not self.official_test:
            return None
        images, targets = self._load(train=False)
        return TensorImageDataset(images, targets, range(len(targets)), self._transform(False))
