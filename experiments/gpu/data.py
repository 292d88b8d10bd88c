"""CIFAR-10 for the GPU check: packed once, decoded once to a uint8 array, batches augmented on the device.

The split is the CPU study's: :class:`~lightning_dbq.data.ImageFolderDataModule` with ``val_per_class=500`` and
``seed=0`` (45,000 train / 5,000 val images of the JPEG tree), optionally a class-balanced training subset (smoke).

The cache is a folder of plain ``.npy`` files (read with ``allow_pickle=False``: nothing is unpickled) that holds
the image *files* of the split, byte for byte, so that it is small enough to carry to a remote GPU machine in one
transfer (CIFAR-10: 46 MB of JPEG bytes against 154 MB decoded):

* ``meta.json``: ``{"rows": N, "size": 32, "train": [row, ...], "val": [row, ...], "classes": [...], "root": ...}``;
* ``files.npy``: every file's bytes, concatenated (uint8); ``offsets.npy``: ``(N + 1,)`` int64 boundaries;
* ``targets.npy``: ``(N,)`` int64 labels.

:func:`load_cache` decodes the files once (torchvision's decoder, the same call as the CPU data module, so the
pixels are the CPU study's) into one ``(N, 3, size, size)`` uint8 tensor. On the device a training batch is a
random crop (zero padding 4) and a horizontal flip (p = 0.5) of the uint8 images, then ``/255`` and the CIFAR-10
normalisation — the CPU data module's transform, vectorised over the batch and driven by a device generator seeded
by ``(seed, epoch)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_dbq.data._base import resize_center_crop
from lightning_dbq.data.imagefolder import ImageFolderDataModule, decode_rgb_bytes
from lightning_dbq.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["DeviceBatches", "build_cache", "crop_flip", "decode_bytes", "load_cache"]

_META_KEYS = {"rows", "size", "train", "val", "classes", "root"}


def build_cache(
    root: str | Path, out: str | Path, *, val_per_class: int = 500, train_subset: int | None = None, size: int = 32
) -> dict[str, Any]:
    """Pack the image files of the split into ``out`` (see the module docstring); returns the metadata.

    Args:
        root: ImageFolder tree (CIFAR-10 JPEG training images).
        out: Cache folder (created; the files of an existing cache there are overwritten).
        val_per_class: Validation images per class (500: the 5,000-image split of the CPU study).
        train_subset: Class-balanced training subset size (``None``: all remaining images).
        size: Image side the decoder produces (shorter side resized and center-cropped when the files differ).
    """
    from tqdm.auto import tqdm

    dm = ImageFolderDataModule(str(root), image_size=size, val_per_class=val_per_class, train_subset=train_subset,
                               seed=0)  # fmt: skip
    split = dm.split_indices()
    used = sorted(set(split.train) | set(split.val))
    row_of = {idx: row for row, idx in enumerate(used)}
    samples = dm.samples
    blobs, targets = [], np.empty(len(used), dtype=np.int64)
    for row, idx in enumerate(tqdm(used, desc="pack images", unit="img", mininterval=2.0)):
        path, targets[row] = samples[idx]
        blobs.append(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8))
    offsets = np.zeros(len(used) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "files.npy", np.concatenate(blobs) if blobs else np.empty(0, np.uint8), allow_pickle=False)
    np.save(out / "offsets.npy", offsets, allow_pickle=False)
    np.save(out / "targets.npy", targets, allow_pickle=False)
    meta = {"rows": len(used), "size": size, "train": [row_of[i] for i in split.train],
            "val": [row_of[i] for i in split.val], "classes": dm.class_names, "root": str(root)}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def decode_bytes(data: np.ndarray, size: int, name: str = "image") -> Tensor:
    """One image file's bytes -> ``(3, size, size)`` uint8 RGB (the library's decoder, then resize/crop if needed)."""
    return resize_center_crop(decode_rgb_bytes(torch.from_numpy(data.copy()), name), size)


def _rows(meta: dict[str, Any], key: str) -> list[int]:
    rows = meta[key]
    if not isinstance(rows, list) or not all(isinstance(r, int) and 0 <= r < meta["rows"] for r in rows):
        raise ValueError(f"cache meta.json: {key!r} must be a list of row indices in [0, {meta['rows']})")
    return rows


def _array(path: Path, dtype: type, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"uint8 image cache: missing {path}")
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != dtype or arr.ndim != ndim:
        raise ValueError(f"{path}: expected a {ndim}-d {np.dtype(dtype)} array, got {arr.ndim}-d {arr.dtype}")
    return arr


def load_cache(path: str | Path) -> tuple[Tensor, Tensor, list[int], list[int], dict[str, Any]]:
    """``(images uint8 (N, 3, S, S), targets int64 (N,), train rows, val rows, meta)``, decoding the files once.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the file or field that is malformed or does not match ``meta.json``.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no uint8 image cache at {path} (missing meta.json); build it with build_cache()")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise ValueError(f"{meta_path}: expected the keys {sorted(_META_KEYS)}")
    if not isinstance(meta["rows"], int) or not isinstance(meta["size"], int) or meta["size"] < 1:
        raise ValueError(f"{meta_path}: 'rows' and 'size' must be integers (size >= 1)")
    files = _array(path / "files.npy", np.uint8, 1)
    offsets = _array(path / "offsets.npy", np.int64, 1)
    targets = _array(path / "targets.npy", np.int64, 1)
    n = meta["rows"]
    if len(offsets) != n + 1 or len(targets) != n or offsets[0] != 0 or offsets[-1] != len(files) \
            or np.any(np.diff(offsets) <= 0):  # fmt: skip
        raise ValueError(f"{path}: offsets.npy must rise from 0 to len(files.npy) = {len(files)} in {n} steps and "
                         f"targets.npy hold {n} labels (meta.json 'rows')")  # fmt: skip
    size = meta["size"]
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for row in tqdm(range(n), desc="decode images", unit="img", mininterval=2.0):
        images[row] = decode_bytes(files[offsets[row] : offsets[row + 1]], size, f"cache row {row}")
    return images, torch.from_numpy(targets), _rows(meta, "train"), _rows(meta, "val"), meta


def crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per-image random crop (zero padding ``padding``, same size out) and horizontal flip (p = 0.5), vectorised.

    Equal, image by image, to ``TF.crop(TF.pad(img, padding), top, left, H, W)`` then ``TF.hflip`` where flipped,
    with ``top, left`` uniform in ``[0, 2 * padding]`` (torchvision's ``RandomCrop(padding=...)`` and
    ``RandomHorizontalFlip``).
    Draws ``top``, ``left`` and the flips from ``generator`` (on the images' device).
    """
    n, _, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]
    rows = top[:, None] + torch.arange(h, device=dev)
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceBatches:
    """An epoch iterable of normalised ``(x, y)`` batches cut from uint8 images resident on one device.

    Args:
        images: ``(N, 3, S, S)`` uint8 (moved to ``device`` once).
        targets: ``(N,)`` int64 labels.
        batch_size: Batch size (the last batch may be smaller).
        train: Shuffle and augment (random crop, padding 4, and flip); otherwise in order, un-augmented.
        seed: Seed of the shuffles and augmentations; epoch ``e`` uses ``(seed, e)``.
        device: Where batches are made.
        mean: Normalisation mean (default CIFAR-10's).
        std: Normalisation std.
    """

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int, *, train: bool, seed: int = 0,
                 device: str | torch.device = "cpu", mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:  # fmt: skip
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(targets) or len(images) == 0:
            raise ValueError(f"images: expected a non-empty (N, C, H, W) uint8 tensor with N labels, got "
                             f"{images.dtype} {tuple(images.shape)} and {len(targets)} labels")  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = targets.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.images)
        order = torch.randperm(n, device=self.device, generator=gen) if self.train else None
        self.epoch += int(self.train)
        for start in range(0, n, self.batch_size):
            sel = slice(start, start + self.batch_size) if order is None else order[start : start + self.batch_size]
            x = self.images[sel]
            if self.train:
                x = crop_flip(x, 4, gen)
            yield (x.float().div_(255) - self.mean) / self.std, self.targets[sel]


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.gpu.data``: pack the CIFAR-10 split into a cache folder (to carry to a GPU machine)."""
    import argparse

    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--root", type=Path, default=root.parent / "shared" / "data" / "cifar10" / "train")
    p.add_argument("--out", type=Path, default=root / "experiments" / "gpu" / "cache")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--train-subset", type=int, default=None)
    args = p.parse_args(argv)
    meta = build_cache(args.root, args.out, val_per_class=args.val_per_class, train_subset=args.train_subset)
    mib = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"{meta['rows']} images ({len(meta['train'])} train / {len(meta['val'])} val), {mib:.1f} MiB -> {args.out}")


if __name__ == "__main__":
    main()
