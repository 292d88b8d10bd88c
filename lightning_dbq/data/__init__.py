"""LightningDataModules: ``digits`` (embedded default), ``imagefolder``, ``cifar10`` (torchvision), ``synthetic``.

All share one API (see :class:`~lightning_dbq.data._base.SplitDataModule`): the keyword arguments of
:class:`SplitArgs` (``batch_size``, ``seed``, ``val_fraction``, ...), declared once there; ``num_classes`` /
``in_chans`` / ``image_size`` right after ``__init__``; a seeded stratified train/val split exposed by
``split_indices()``; and ``calibration_batches()`` (a fixed, un-augmented subset of the train split for Hessian
profiling).
"""

from lightning_dbq.data._base import SplitArgs, SplitDataModule, SplitIndices, balanced_subset, stratified_split
from lightning_dbq.data.cifar10 import CIFAR10DataModule
from lightning_dbq.data.digits import DigitsDataModule
from lightning_dbq.data.imagefolder import ImageFolderDataModule
from lightning_dbq.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "SplitArgs",
    "SplitDataModule",
    "SplitIndices",
    "SyntheticDataModule",
    "balanced_subset",
    "stratified_split",
]
