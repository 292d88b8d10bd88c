"""CIFAR-10 through ``torchvision.datasets.CIFAR10`` (the python pickle batches), held in memory as uint8."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2
from typing_extensions import Unpack

from lightning_dbq.data._base import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Batch,
    SplitArgs,
    SplitDataModule,
    TensorImageDataset,
    check_int,
    check_mean_std,
    image_transform,
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
        image_size: Side of the model input (images are resized once at load time when it differs from 32).
        augment: Random crop (padding 4) + horizontal flip on training images.
        official_test: Test on CIFAR-10's test set (``True``) or on the validation split (``False``).
        mean: Normalisation mean.
        std: Normalisation std.
        **kwargs: The shared :class:`~lightning_dbq.data.SplitArgs` (``batch_size``, ``val_per_class``, ``seed``, ...).

    Raises:
        FileNotFoundError: If the data is absent and ``download=False`` (the message says to pass
            ``download=True``).
        ValueError: For an out-of-range argument (the message names it).
    """

    def __init__(
        self,
        root: str,
        download: bool = False,
        image_size: int = 32,
        augment: bool = True,
        official_test: bool = True,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        **kwargs: Unpack[SplitArgs],
    ) -> None:
        super().__init__(**self.split_kwargs(**kwargs))
        check_int("image_size", image_size, 1)
        check_mean_std(mean, std)
        self.root = os.fspath(root)
        self.download = download
        if not download:
            missing = _missing_files(self.root)
            if missing:
                raise _not_found(self.root, f"missing {', '.join(missing)}")
        self.num_classes = 10
        self.in_chans = 3
        self.image_size = image_size
        self.augment = augment
        self.official_test = official_test
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._train_pool: tuple[Tensor, Tensor] | None = None
        self._classes: list[str] | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """``mean`` / ``std`` as given, ``image_size``, 3 channels, ``"bilinear"`` (images of another size are resized
        on the shorter side, antialiased, and center-cropped). Available right after ``__init__``."""
        return self._preprocessing(self.mean, self.std, "bilinear")

    @property
    def class_names(self) -> list[str]:
        """CIFAR-10's label names (``batches.meta``) in class-index order: ``airplane``, ``automobile``, ...

        Available after ``setup()`` (they are read with the images).

        Raises:
            RuntimeError: before ``setup()``, or when the dataset names no classes.
        """
        if self._classes is None:
            raise RuntimeError("CIFAR10DataModule.class_names is available after setup() (the names are read from "
                               "the dataset's batches.meta with the images)")  # fmt: skip
        return list(self._classes)

    def prepare_data(self) -> None:
        """Download CIFAR-10 when ``download=True`` (called on one process per node by Lightning)."""
        if self.download:
            CIFAR10(self.root, train=True, download=True)

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            dataset = CIFAR10(self.root, train=train, download=False)
        except RuntimeError as err:
            raise _not_found(self.root, str(err)) from err
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, list) and len(classes) == self.num_classes:
            self._classes = [str(c) for c in classes]
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
        images = resize_center_crop(images, self.image_size).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def _pool(self) -> tuple[Tensor, Tensor]:
        if self._train_pool is None:
            self._train_pool = self._load(train=True)
        return self._train_pool

    def _targets(self) -> Sequence[int]:
        return self._pool()[1].tolist()

    def _transform(self, train: bool) -> v2.Compose:
        aug = train and self.augment
        return image_transform(self.mean, self.std, size=self.image_size, crop_padding=4 if aug else 0, flip=aug)

    def _dataset(self, indices: Sequence[int], *, train: bool) -> Dataset[Batch]:
        images, targets = self._pool()
        return TensorImageDataset(images, targets, indices, self._transform(train))

    def _test_dataset(self) -> Dataset[Batch] | None:
        if not self.official_test:
            return None
        images, targets = self._load(train=False)
        return TensorImageDataset(images, targets, range(len(targets)), self._transform(False))
