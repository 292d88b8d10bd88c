"""Any ImageFolder tree (``root/<class>/<image>``), e.g. the CIFAR-10 training JPEGs, with a seeded split."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.io import ImageReadMode, decode_image, read_file
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

__all__ = ["ImageFolderDataModule", "decode_rgb"]


def decode_rgb(path: str) -> Tensor:
    """Decode an image file to a ``(3, H, W)`` uint8 RGB tensor (torchvision's decoder, PIL as fallback).

    Raises:
        ValueError: naming the file, when it cannot be read or decoded or is a truncated JPEG (libjpeg would
            otherwise fill the missing part with gray without an error).
    """
    try:
        data = read_file(path)
    except RuntimeError as e:
        raise ValueError(f"cannot read image file {path!r}: {e}") from e
    return decode_rgb_bytes(data, f"image file {path!r}")


def decode_rgb_bytes(data: Tensor, name: str = "image") -> Tensor:
    """Decode an image file's bytes (1-d uint8 tensor) like :func:`decode_rgb`; errors name ``name``."""
    head, tail = bytes(data[:2].tolist()), bytes(data[-1024:].tolist())
    if head == b"\xff\xd8" and b"\xff\xd9" not in tail:
        raise ValueError(f"truncated JPEG {name}: no end-of-image marker ({data.numel()} bytes); re-copy the file")
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise ValueError(f"cannot decode {name}: {type(e).__name__}: {e}") from e


def _check_dir(name: str, path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}: no such directory {path!r} (expected an ImageFolder tree root/<class>/*)")
    try:
        find_classes(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: no class folders found in {path!r} ({err})") from err
    return path


def _check_same_classes(classes: list[str], test_classes: list[str], root: str, test_root: str) -> None:
    if test_classes != classes:
        raise ValueError(
            f"test_root classes {test_classes} differ from root classes {classes} "
            f"(test_root={test_root!r}, root={root!r}): the test tree must have the training tree's class folders"
        )


class _FileImageDataset(Dataset[Batch]):
    """Decodes ``samples[indices[i]]`` from disk on every access."""

    def __init__(
        self, samples: list[tuple[str, int]], indices: Sequence[int], transform: Callable[[Tensor], Tensor]
    ) -> None:
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
        image_size: Side of the square model input.
        augment: Random crop (padding 4) + horizontal flip on training images.
        test_root: Optional separate ImageFolder tree that ``test_dataloader`` reads (every image, un-augmented),
            validated like ``root``; its class folders must be those of ``root``. Default: test on the validation
            split.
        mean: Normalisation mean (default: CIFAR-10's).
        std: Normalisation std (default: CIFAR-10's).
        cache_in_memory: Decode the images once into memory.
        **kwargs: The shared :class:`~lightning_dbq.data.SplitArgs` (``batch_size``, ``val_per_class``, ``seed``, ...).

    Raises:
        FileNotFoundError: If ``root`` (or ``test_root``) is missing or has no class folders.
        ValueError: For an out-of-range argument (the message names it), or when the class folders of
            ``test_root`` differ from those of ``root`` (the message names both roots).

    Example:
        >>> dm = ImageFolderDataModule("/path/to/cifar10/train", val_per_class=500)  # doctest: +SKIP
        >>> dm.num_classes, len(dm.split_indices().val)  # doctest: +SKIP
        (10, 5000)
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        augment: bool = True,
        test_root: str | None = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        cache_in_memory: bool = False,
        **kwargs: Unpack[SplitArgs],
    ) -> None:
        super().__init__(**self.split_kwargs(**kwargs))
        check_int("image_size", image_size, 1)
        check_mean_std(mean, std)
        self.root = _check_dir("root", os.fspath(root))
        self.test_root = None if test_root is None else _check_dir("test_root", os.fspath(test_root))
        self.classes = find_classes(self.root)[0]
        if len(self.classes) < 2:
            raise ValueError(f"root: {self.root!r} has {len(self.classes)} class folder(s) {self.classes}; "
                             "classification needs at least 2 (one sub-folder per class)")  # fmt: skip
        if self.test_root is not None:
            _check_same_classes(self.classes, find_classes(self.test_root)[0], self.root, self.test_root)
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
    def preprocessing(self) -> dict[str, Any]:
        """``mean`` / ``std`` as given, ``image_size``, 3 channels (images are decoded as RGB), ``"bilinear"``
        (shorter side resized, antialiased, then center-cropped). Available right after ``__init__``."""
        return self._preprocessing(self.mean, self.std, "bilinear")

    @property
    def class_names(self) -> list[str]:
        """The class folder names of ``root`` in class-index order (sorted, as ``ImageFolder`` numbers them).
        Available right after ``__init__``."""
        return list(self.classes)

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

    def _transform(self, train: bool, resize: bool) -> v2.Compose:
        aug = train and self.augment
        pad = 4 if aug else 0
        return image_transform(self.mean, self.std, size=self.image_size, resize=resize, crop_padding=pad, flip=aug)

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
        _check_same_classes(self.classes, folder.classes, self.root, self.test_root)
        indices = range(len(folder.samples))
        if not self.cache_in_memory:
            return _FileImageDataset(folder.samples, indices, self._transform(False, resize=True))
        images, targets = self._decode_all(folder.samples, indices)
        return TensorImageDataset(images, targets, indices, self._transform(False, resize=False))
