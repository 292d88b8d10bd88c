"""LightningDataModules: ``digits`` (embedded default), ``imagefolder``, ``cifar10`` (torchvision), ``synthetic``.

All share one API (see :class:`~lightning_dbq.data._base.SplitDataModule`): the keyword arguments of
:class:`SplitArgs` (``batch_size``, ``seed``, ``val_fraction``, ...), declared once there; ``num_classes`` /
``in_chans`` / ``image_size`` right after ``__init__``; a seeded stratified train/val split exposed by
``split_indices()``; ``calibration_batches()`` (a fixed, un-augmented subset of the train split for Hessian
profiling); and the ``preprocessing`` / ``class_names`` properties that ``save_int`` records in the artifact.

:func:`~lightning_dbq.data.preprocess.apply_preprocessing` applies such a record to serving images. The names are
loaded on first use (PEP 562), so importing :mod:`lightning_dbq.data.preprocess` does not import lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; at run time see __getattr__
    from lightning_dbq.data._base import SplitArgs, SplitDataModule, SplitIndices, balanced_subset, stratified_split
    from lightning_dbq.data.cifar10 import CIFAR10DataModule
    from lightning_dbq.data.digits import DigitsDataModule
    from lightning_dbq.data.imagefolder import ImageFolderDataModule
    from lightning_dbq.data.preprocess import apply_preprocessing
    from lightning_dbq.data.synthetic import SyntheticDataModule

_WHERE = {
    "CIFAR10DataModule": "cifar10",
    "DigitsDataModule": "digits",
    "ImageFolderDataModule": "imagefolder",
    "SplitArgs": "_base",
    "SplitDataModule": "_base",
    "SplitIndices": "_base",
    "SyntheticDataModule": "synthetic",
    "apply_preprocessing": "preprocess",
    "balanced_subset": "_base",
    "stratified_split": "_base",
}

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "SplitArgs",
    "SplitDataModule",
    "SplitIndices",
    "SyntheticDataModule",
    "apply_preprocessing",
    "balanced_subset",
    "stratified_split",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its submodule on first access (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_dbq.data' has no attribute {name!r}")
    value = getattr(import_module(f"lightning_dbq.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
