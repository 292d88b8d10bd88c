"""The FQT study's transfer split of the CIFAR-10 JPEG tree: pretrain on 5 classes, fine-tune on the other 5.

Classes in ImageFolder order (sorted folder names): the first five (airplane, automobile, bird, cat, deer) are the
*source* task, the last five (dog, frog, horse, ship, truck) the *target* task. Per class a seeded permutation
(seed 0) of the files picks the images: source ``pre_per_class`` for pretraining; target ``ft_per_class`` for
fine-tuning and the next ``val_per_class`` as its held-out validation set. Images are decoded once into a uint8
tensor cached under ``experiments/fqt/runs/`` (not committed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_dbq.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["SOURCE", "TARGET", "Batches", "load_split"]

SOURCE = slice(0, 5)
TARGET = slice(5, 10)


def _files(root: Path, classes: list[str], per_class: int, offset: int) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(classes):
        names = sorted((root / cls).iterdir())
        order = np.random.default_rng(0).permutation(len(names))[offset : offset + per_class]
        if len(order) < per_class:
            raise ValueError(f"{root / cls}: {len(names)} images, need {offset + per_class}")
        files += [names[i] for i in order]
        labels += [label] * per_class
    return files, labels


def load_split(root: Path, cache: Path, task: slice, per_class: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(images uint8 (N,3,32,32), labels int64)`` of ``per_class`` images per class of ``task`` (0-based labels)."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())[task]
    key = cache / f"data_{classes[0]}_{len(classes)}_{per_class}_{offset}.pt"
    if key.is_file():
        blob = torch.load(key, weights_only=True)
        return blob["x"], blob["y"]
    files, labels = _files(root, classes, per_class, offset)
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f in files])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y, "classes": classes}, key)
    return x, y


def normalize(x: Tensor) -> Tensor:
    """uint8 images → float, CIFAR-10 mean/std normalised."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


class Batches:
    """An iterable of ``(x, y)`` batches (a Lightning-compatible train/val loader without worker processes).

    ``augment``: random crop with 4-pixel zero padding and horizontal flip per image, from a generator seeded with
    ``seed`` + epoch; ``shuffle`` likewise.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, augment: bool, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.augment, self.seed = x, y, batch_size, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.y), generator=gen) if self.augment else torch.arange(len(self.y))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = _augment(x, gen)
            yield normalize(x), self.y[idx]


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        img = padded[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = img.flip(-1) if bool(flip[i]) else img
    return out


def describe(root: Path, task: slice) -> list[Any]:
    """The class names of ``task``."""
    return sorted(p.name for p in root.iterdir() if p.is_dir())[task]
