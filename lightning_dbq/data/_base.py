"""Shared pieces of the data modules: seeded stratified splits, tensor transforms and the base DataModule.

Every split is computed with a CPU ``torch.Generator`` seeded from ``seed`` only, so it is identical on every call,
process, DDP rank and machine (given the same files). Index lists always refer to positions in the underlying
dataset (for ImageFolder: ``ImageFolder(root).samples``, which is sorted by class folder, then file name).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from typing_extensions import TypedDict, Unpack

from lightning_dbq.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "SplitArgs",
    "SplitDataModule",
    "SplitIndices",
    "balanced_subset",
    "image_transform",
    "stratified_split",
]

# Offsets that derive independent generator streams from the one user-facing seed.
_SPLIT_STREAM, _SUBSET_STREAM, _CALIB_STREAM, _SHUFFLE_STREAM = 0, 1, 2, 3

Batch = tuple[Tensor, Tensor]


class SplitIndices(NamedTuple):
    """Sorted train / validation indices into the underlying dataset."""

    train: list[int]
    val: list[int]


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


class EpochRandomSampler(RandomSampler):
    """Shuffles with a generator seeded by ``(seed, epoch)``; Lightning calls :meth:`set_epoch` every epoch.

    Unlike a DataLoader ``generator`` (whose state is lost when a run resumes from a checkpoint), the order of
    epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run sees exactly the batches an uninterrupted run
    would. Being a ``RandomSampler``, Lightning swaps it for a ``DistributedSampler`` (seeded, per-epoch) under DDP.
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + _SHUFFLE_STREAM) * 100_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()


def _per_class(targets: Sequence[int], indices: Sequence[int] | None = None) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for idx in range(len(targets)) if indices is None else indices:
        groups.setdefault(int(targets[idx]), []).append(int(idx))
    return dict(sorted(groups.items()))


def stratified_split(
    targets: Sequence[int],
    *,
    seed: int,
    val_fraction: float = 0.1,
    val_per_class: int | None = None,
) -> SplitIndices:
    """Split indices into train / val with a seeded permutation per class.

    Args:
        targets: Class index of every sample.
        seed: Seed of the permutation; the same seed always gives the same split.
        val_fraction: Fraction of each class held out (rounded, at least 1 sample per class).
        val_per_class: Exact number held out per class; takes precedence over ``val_fraction``.

    Returns:
        The sorted train and val indices (disjoint, covering every index).

    Raises:
        ValueError: If a class is too small to keep at least one training sample.

    Example:
        >>> split = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], seed=0, val_per_class=1)
        >>> len(split.train), len(split.val)
        (6, 2)
    """
    gen = _generator(seed, _SPLIT_STREAM)
    train: list[int] = []
    val: list[int] = []
    for label, members in _per_class(targets).items():
        if val_per_class is not None:
            n_val, arg = val_per_class, f"val_per_class={val_per_class}"
        else:
            n_val, arg = max(1, round(len(members) * val_fraction)), f"val_fraction={val_fraction}"
        if n_val >= len(members):
            raise ValueError(
                f"{arg} leaves no training sample for class {label} ({len(members)} samples); lower it or add data"
            )
        order = torch.randperm(len(members), generator=gen).tolist()
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return SplitIndices(sorted(train), sorted(val))


def balanced_subset(indices: Sequence[int], targets: Sequence[int], num: int, *, seed: int) -> list[int]:
    """Pick ``num`` of ``indices`` spread evenly over classes (seeded, deterministic).

    Each class's members are permuted with a seeded generator and the classes are visited round-robin, so class
    counts differ by at most one (unless a class runs out). The result keeps that round-robin order, so any prefix
    is balanced too.

    Args:
        indices: Candidate indices into ``targets``.
        targets: Class index of every sample of the underlying dataset.
        num: How many to pick; clamped to ``len(indices)``.
        seed: Seed of the per-class permutations.

    Returns:
        The chosen indices.
    """
    return _balanced(indices, targets, num, _generator(seed, _SUBSET_STREAM))


def _balanced(indices: Sequence[int], targets: Sequence[int], num: int, gen: torch.Generator) -> list[int]:
    queues = []
    for members in _per_class(targets, indices).values():
        order = torch.randperm(len(members), generator=gen).tolist()
        queues.append([members[i] for i in order])
    chosen: list[int] = []
    depth = 0
    num = min(num, len(indices))
    while len(chosen) < num:
        for queue in queues:
            if depth < len(queue) and len(chosen) < num:
                chosen.append(queue[depth])
        depth += 1
    return chosen


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and center-crop a square; no-op if equal.

    Accepts one ``(C, H, W)`` image or a ``(N, C, H, W)`` batch, uint8 or float (``torchvision.transforms.v2``).
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = TF.resize(images, [size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [size, size])


def image_transform(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size: int,
    resize: bool = False,
    crop_padding: int = 0,
    flip: bool = False,
) -> v2.Compose:
    """CHW image tensor → normalised float tensor (a ``torchvision.transforms.v2`` pipeline).

    Steps: optional :func:`resize_center_crop` to ``size``; uint8 → float in [0, 1] (float input is kept as is);
    optional ``RandomCrop(size, padding=crop_padding)`` (zero padding, before normalisation) and horizontal flip
    (p = 0.5); ``Normalize(mean, std)``. Randomness comes from torch's global RNG (seeded per DataLoader worker by
    torch, and by ``seed_everything``); the sample *order* is seeded separately (:class:`EpochRandomSampler`).

    Args:
        mean: Per-channel mean (length ``C`` or 1).
        std: Per-channel std (length ``C`` or 1).
        size: Side of the square output image.
        resize: Resize + center-crop to ``size`` first (otherwise the input must already be ``size`` × ``size``).
        crop_padding: Zero padding of the random crop; 0 disables the crop.
        flip: Random horizontal flip.
    """
    steps: list[Callable[..., Any]] = []
    if resize:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if crop_padding > 0:
        steps.append(v2.RandomCrop(size, padding=crop_padding))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.Normalize([float(m) for m in mean], [float(s) for s in std]))
    return v2.Compose(steps)


class TensorImageDataset(Dataset[Batch]):
    """Samples ``indices`` of an in-memory ``(N, C, H, W)`` image tensor, applying ``transform`` per image."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Sequence[int],
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.images = images
        self.targets = targets
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        idx = self.indices[i]
        image = self.images[idx]
        return (self.transform(image) if self.transform is not None else image), self.targets[idx]


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 < value < 1``."""
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def check_mean_std(mean: Sequence[float], std: Sequence[float], channels: int = 3) -> None:
    """Raise ``ValueError`` unless ``mean`` and ``std`` have ``channels`` values and ``std`` is positive."""
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std must have {channels} values (RGB), got mean={mean!r}, std={std!r}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")


class SplitArgs(TypedDict, total=False):
    """Keyword arguments every data module accepts (declared once here; see :class:`SplitDataModule`).

    Attributes:
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        seed: Seed of the split, the train subset, the calibration subset and the train shuffling.
        pin_memory: DataLoader ``pin_memory``.
        drop_last: Drop the last incomplete training batch (avoids BatchNorm on a batch of 1).
        val_fraction: Fraction of each class held out for validation.
        val_per_class: Exact number of images per class held out; takes precedence over ``val_fraction``.
        train_subset: Keep only this many training images (per-class balanced, seeded); ``None`` keeps all.
    """

    batch_size: int
    num_workers: int
    seed: int
    pin_memory: bool
    drop_last: bool
    val_fraction: float
    val_per_class: int | None
    train_subset: int | None


class SplitDataModule(pl.LightningDataModule):
    """Base class: seeded stratified train/val split, loaders and calibration batches.

    Subclasses add only their own constructor arguments, take the shared ones as ``**kwargs: Unpack[SplitArgs]``
    and pass them on with :meth:`split_kwargs` (which applies the subclass's :attr:`split_defaults`). They set
    ``num_classes``, ``in_chans`` and ``image_size`` in ``__init__`` and implement ``_targets`` (labels of the train
    pool, loading whatever is needed) and ``_dataset``. ``hparams`` records every argument, shared and own.

    Args:
        batch_size, num_workers, seed, pin_memory, drop_last, val_fraction, val_per_class, train_subset: see
            :class:`SplitArgs`.
    """

    num_classes: int
    in_chans: int
    image_size: int
    #: Subclass defaults of the shared arguments that differ from this class's (e.g. ``{"batch_size": 32}``).
    split_defaults: ClassVar[SplitArgs] = {}

    def __init__(
        self,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        val_fraction: float = 0.1,
        val_per_class: int | None = None,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        check_fraction("val_fraction", val_fraction)
        if val_per_class is not None:
            check_int("val_per_class", val_per_class, 1)
        if train_subset is not None:
            check_int("train_subset", train_subset, 1)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.val_fraction = val_fraction
        self.val_per_class = val_per_class
        self.train_subset = train_subset
        # collects this frame's arguments and those of the subclass __init__ that called it
        self.save_hyperparameters()
        self._split: SplitIndices | None = None
        self.train_set: Dataset[Batch] | None = None
        self.val_set: Dataset[Batch] | None = None
        self.test_set: Dataset[Batch] | None = None

    @classmethod
    def split_kwargs(cls, **kwargs: Unpack[SplitArgs]) -> SplitArgs:
        """The shared arguments a subclass passes to ``super().__init__``: its :attr:`split_defaults`, then the
        caller's ``kwargs``."""
        return {**cls.split_defaults, **kwargs}

    @abstractmethod
    def _targets(self) -> Sequence[int]:
        """Labels of every sample of the train pool (loads or scans the data on first use)."""

    @abstractmethod
    def _dataset(self, indices: Sequence[int], *, train: bool) -> Dataset[Batch]:
        """Dataset over ``indices`` of the train pool, augmented iff ``train``."""

    def _test_dataset(self) -> Dataset[Batch] | None:
        """A separate test set, or ``None`` to test on the validation split."""
        return None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How an evaluation image becomes a model input, as ``save_int(preprocessing=...)`` records it.

        ``{"mean": [...], "std": [...], "image_size": int, "interpolation": "bilinear" | "bicubic" | "nearest" |
        "none", "channels": int}`` (see :func:`~lightning_dbq.data.preprocess.apply_preprocessing`).

        Raises:
            NotImplementedError: a data module that does not describe its preprocessing (the base class).
        """
        raise NotImplementedError(f"{type(self).__name__} does not describe its preprocessing")

    @property
    def class_names(self) -> list[str]:
        """The label of each class index, as ``save_int(class_names=...)`` records it.

        Raises:
            NotImplementedError: a data module that does not name its classes (the base class).
        """
        raise NotImplementedError(f"{type(self).__name__} does not name its classes")

    def _preprocessing(self, mean: Sequence[float], std: Sequence[float], interpolation: str) -> dict[str, Any]:
        """The ``preprocessing`` record of this module's ``image_size`` and ``in_chans``."""
        return {
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "image_size": int(self.image_size),
            "interpolation": interpolation,
            "channels": int(self.in_chans),
        }

    def split_indices(self) -> SplitIndices:
        """Return the (cached) train / val indices into the train pool.

        ``train`` is the training set actually used, i.e. after ``train_subset``. Available before ``setup``.
        """
        if self._split is None:
            targets = self._targets()
            split = stratified_split(
                targets, seed=self.seed, val_fraction=self.val_fraction, val_per_class=self.val_per_class
            )
            if self.train_subset is not None:
                if self.train_subset > len(split.train):
                    raise ValueError(f"train_subset={self.train_subset} exceeds the {len(split.train)} training images")
                subset = balanced_subset(split.train, targets, self.train_subset, seed=self.seed)
                split = SplitIndices(sorted(subset), split.val)
            self._split = split
        return self._split

    def calibration_indices(self, num_images: int = 1000) -> list[int]:
        """Fixed, class-balanced indices of ``num_images`` training images (all of them if fewer exist)."""
        check_int("num_images", num_images, 1)
        train = self.split_indices().train
        return _balanced(train, self._targets(), num_images, _generator(self.seed, _CALIB_STREAM))

    def calibration_batches(self, num_images: int = 1000, batch_size: int = 128) -> list[Batch]:
        """Return a fixed, un-augmented, class-balanced subset of the train split as ``(x, y)`` batches.

        The same ``seed`` always gives the same images in the same order (e.g. for Hessian profiling).

        Args:
            num_images: Number of images (clamped to the training-set size).
            batch_size: Images per batch (the last batch may be smaller).

        Returns:
            A list of ``(images, labels)`` CPU tensor pairs.
        """
        check_int("batch_size", batch_size, 1)
        dataset = self._dataset(self.calibration_indices(num_images), train=False)
        return list(DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0))

    def setup(self, stage: str | None = None) -> None:
        """Build the train / val / test datasets (idempotent)."""
        if self.train_set is not None:
            return
        split = self.split_indices()
        self.train_set = self._dataset(split.train, train=True)
        self.val_set = self._dataset(split.val, train=False)
        self.test_set = self._test_dataset() or self.val_set

    def _loader(self, dataset: Dataset[Batch] | None, *, train: bool) -> DataLoader[Batch]:
        assert dataset is not None, "setup() must build the datasets"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochRandomSampler(dataset, self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and train,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled (seeded generator), augmented training loader."""
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        """Validation loader, not shuffled."""
        self.setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader[Batch]:
        """Test loader (the validation split unless a separate test set exists), not shuffled."""
        self.setup()
        return self._loader(self.test_set, train=False)
