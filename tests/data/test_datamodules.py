"""Tests for the data modules: splits, shapes, calibration batches, errors (no downloads, no real data)."""

from __future__ import annotations

import inspect
import pickle
import re
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import lightning_dbq.data.cifar10 as cifar10_mod
from lightning_dbq.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SplitArgs,
    SplitDataModule,
    SyntheticDataModule,
    balanced_subset,
    stratified_split,
)
from lightning_dbq.data._base import image_transform, resize_center_crop

CLASSES = ["ant", "bee", "cat"]
PER_CLASS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 12 random images: PNG and JPEG, one of them 40×36 (resized to 32×32)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            shape = (36, 40, 3) if (label, i) == (0, 0) else (32, 32, 3)
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            pixels[..., label] = 255 - label * 60  # a class-dependent colour
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{ext}")
    return root


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- split helpers


def test_stratified_split_is_seeded_disjoint_and_stratified() -> None:
    targets = [i % 4 for i in range(103)]
    a = stratified_split(targets, seed=3, val_fraction=0.2)
    assert a == stratified_split(targets, seed=3, val_fraction=0.2)
    assert a != stratified_split(targets, seed=4, val_fraction=0.2)
    assert not set(a.train) & set(a.val)
    assert sorted(a.train + a.val) == list(range(103))
    assert a.train == sorted(a.train)
    assert a.val == sorted(a.val)
    per_class = Counter(targets[i] for i in a.val)
    assert per_class == {c: round(targets.count(c) * 0.2) for c in range(4)}
    exact = stratified_split(targets, seed=0, val_fraction=0.9, val_per_class=5)  # val_per_class wins
    assert Counter(targets[i] for i in exact.val) == {0: 5, 1: 5, 2: 5, 3: 5}


def test_stratified_split_refuses_to_empty_a_class() -> None:
    with pytest.raises(ValueError, match=r"val_per_class=3 leaves no training sample for class 1"):
        stratified_split([0, 0, 0, 0, 1, 1, 1], seed=0, val_per_class=3)


def test_balanced_subset() -> None:
    targets = [0] * 50 + [1] * 30 + [2] * 4
    indices = list(range(len(targets)))
    chosen = balanced_subset(indices, targets, 30, seed=1)
    assert chosen == balanced_subset(indices, targets, 30, seed=1)
    assert chosen != balanced_subset(indices, targets, 30, seed=2)
    assert len(set(chosen)) == 30
    assert Counter(targets[i] for i in chosen) == {0: 13, 1: 13, 2: 4}  # class 2 runs out
    assert Counter(targets[i] for i in chosen[:9]) == {0: 3, 1: 3, 2: 3}  # every prefix balanced
    assert len(balanced_subset(indices, targets, 1000, seed=0)) == len(indices)


# ---------------------------------------------------------------- shared arguments, constants, transforms


MODULES = [CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, SyntheticDataModule]


def test_shared_args_are_declared_once_and_recorded() -> None:
    shared = set(SplitArgs.__annotations__)
    base = inspect.signature(SplitDataModule.__init__).parameters
    assert shared == {n for n, p in base.items() if p.kind is p.KEYWORD_ONLY}
    for cls in MODULES:  # subclasses add only their own arguments, the shared ones arrive as **kwargs
        params = inspect.signature(cls.__init__).parameters
        assert not shared & set(params), cls.__name__
        assert list(params.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    dm = SyntheticDataModule(num_samples=64, seed=3)
    assert (dm.batch_size, dm.val_fraction, dm.seed, dm.drop_last) == (32, 0.25, 3, False)  # subclass defaults
    assert dict(dm.hparams) == {"num_samples": 64, "num_classes": 4, "image_size": 16, "in_chans": 3, "noise": 0.5,
                                "batch_size": 32, "num_workers": 0, "seed": 3, "pin_memory": False,
                                "drop_last": False, "val_fraction": 0.25, "val_per_class": None,
                                "train_subset": None}  # fmt: skip
    digits = DigitsDataModule(batch_size=8)
    assert (digits.batch_size, digits.val_fraction) == (8, 0.2)
    assert digits.hparams["val_fraction"] == 0.2
    with pytest.raises(TypeError, match="batch_sise"):
        DigitsDataModule(batch_sise=8)  # type: ignore[call-arg]


def test_cifar10_statistics_are_defined_once() -> None:
    import lightning_dbq
    from lightning_dbq.data import _base
    from lightning_dbq.models import cifar_resnet

    assert _base.CIFAR10_MEAN is cifar_resnet.CIFAR10_MEAN
    assert _base.CIFAR10_STD is cifar_resnet.CIFAR10_STD
    package = Path(lightning_dbq.__file__).parent
    defining = [p.name for p in package.rglob("*.py") if re.search(r"^CIFAR10_(MEAN|STD)\b.*=", p.read_text(), re.M)]
    assert defining == ["cifar_resnet.py"]
    assert inspect.signature(ImageFolderDataModule).parameters["mean"].default == (0.4914, 0.4822, 0.4465)


def test_image_transform_numerics() -> None:
    image = torch.randint(0, 256, (3, 36, 40), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain = image_transform(mean, std, size=40)(image)  # no resize, no augmentation
    reference = (image.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(plain, reference, atol=1e-6)
    resized = image_transform(mean, std, size=32, resize=True)(image)
    assert resized.shape == (3, 32, 32)
    assert torch.equal(resized, image_transform(mean, std, size=32)(resize_center_crop(image, 32)))  # cache path
    assert torch.equal(resize_center_crop(image[None], 32)[0], resize_center_crop(image, 32))  # batched == single
    square = torch.rand(1, 8, 8)
    torch.manual_seed(0)
    shifted = [image_transform([0.0], [1.0], size=8, crop_padding=2)(square) for _ in range(30)]
    padded = torch.nn.functional.pad(square, (2, 2, 2, 2))
    windows = {(t, left) for t in range(5) for left in range(5)}
    for out in shifted:  # every output is an 8x8 window of the zero-padded image
        assert any(torch.equal(out, padded[:, t : t + 8, left : left + 8]) for t, left in windows)
    assert len({tuple(o.flatten().tolist()) for o in shifted}) > 5
    torch.manual_seed(0)
    flips = [image_transform([0.0], [1.0], size=8, flip=True)(square) for _ in range(30)]
    assert {torch.equal(f, square) for f in flips} == {True, False}
    assert all(torch.equal(f, square) or torch.equal(f, square.flip(-1)) for f in flips)


def test_train_order_is_seeded_per_epoch_and_resumable() -> None:
    dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=8, seed=2)
    loader = dm.train_dataloader()
    sampler = loader.sampler
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        orders.append(list(sampler))
    assert orders[0] != orders[1]
    fresh = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=8, seed=2)
    resumed = fresh.train_dataloader().sampler
    resumed.set_epoch(1)  # type: ignore[attr-defined]  # a resumed run starts at epoch 1 with a fresh loader
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(resumed) == orders[1]


# ---------------------------------------------------------------- digits


def test_digits_attributes_before_setup() -> None:
    dm = DigitsDataModule(image_size=16, in_chans=1)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 16)
    assert dm._images is None  # nothing loaded yet


def test_digits_split_and_batches(digits: DigitsDataModule) -> None:
    split = digits.split_indices()
    assert len(split.train) + len(split.val) == 1797
    assert not set(split.train) & set(split.val)
    targets = digits._targets()
    val_counts = Counter(targets[i] for i in split.val)
    assert all(abs(val_counts[c] - 0.2 * targets.count(c)) <= 0.5 for c in range(10))
    assert split == DigitsDataModule(batch_size=8).split_indices()
    assert split != DigitsDataModule(seed=1).split_indices()
    x, y = next(iter(digits.val_dataloader()))
    assert x.shape == (64, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.shape == (64,)
    assert y.dtype == torch.int64
    assert y.min() >= 0
    assert y.max() <= 9
    assert torch.equal(x[:, 0], x[:, 2])  # grey replicated
    train_x = torch.cat([b[0] for b in digits.train_dataloader()])
    assert train_x.mean().item() == pytest.approx(0.0, abs=1e-4)  # normalised with train-split stats
    assert train_x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert digits.mean is not None
    assert 0.0 < digits.mean[0] < 1.0


def test_digits_loaders_order(digits: DigitsDataModule) -> None:
    first = [y for _, y in digits.train_dataloader()]
    again = [y for _, y in digits.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # seeded shuffle
    flat = torch.cat(first)
    assert not torch.equal(flat, torch.tensor(digits._targets())[digits.split_indices().train])  # shuffled
    val_y = torch.cat([y for _, y in digits.val_dataloader()])
    assert torch.equal(val_y, torch.tensor(digits._targets())[digits.split_indices().val])  # not shuffled
    test_y = torch.cat([y for _, y in digits.test_dataloader()])
    assert torch.equal(test_y, val_y)


def test_digits_calibration_fixed_and_unaugmented() -> None:
    dm = DigitsDataModule(augment=True, in_chans=1, image_size=24)
    batches = dm.calibration_batches(num_images=100, batch_size=32)
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    again = dm.calibration_batches(num_images=100, batch_size=32)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert batches[0][0].shape == (32, 1, 24, 24)
    idx = dm.calibration_indices(100)
    assert set(idx) <= set(dm.split_indices().train)
    assert Counter(torch.cat([y for _, y in batches]).tolist()) == dict.fromkeys(range(10), 10)
    dm.setup()
    images = dm._load()[0]
    reference = torch.stack([dm.val_set.transform(images[i]) for i in idx[:32]])  # type: ignore[union-attr]
    assert torch.equal(batches[0][0], reference)
    shifted = torch.stack([dm.train_set[0][0] for _ in range(20)])  # type: ignore[index]
    assert not all(torch.equal(s, shifted[0]) for s in shifted)  # augmentation is active on train


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\), got 1.5"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"in_chans": 2}, "in_chans must be 1 or 3, got 2"),
        ({"image_size": 4}, "image_size must be an integer >= 8"),
        ({"train_subset": 0}, "train_subset must be an integer >= 1"),
        ({"val_per_class": 0}, "val_per_class must be an integer >= 1"),
    ],
)
def test_digits_bad_args(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)  # type: ignore[arg-type]


def test_too_large_split_args_fail_on_use() -> None:
    with pytest.raises(ValueError, match="val_per_class=500 leaves no training sample"):
        DigitsDataModule(val_per_class=500).split_indices()
    with pytest.raises(ValueError, match="train_subset=5000 exceeds the"):
        DigitsDataModule(train_subset=5000).setup()


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism() -> None:
    dm = SyntheticDataModule(num_samples=96, num_classes=3, image_size=8, in_chans=2, batch_size=16, seed=5)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (3, 2, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 2, 8, 8)
    assert y.dtype == torch.int64
    split = dm.split_indices()
    assert (len(split.train), len(split.val)) == (72, 24)
    twin = SyntheticDataModule(num_samples=96, num_classes=3, image_size=8, in_chans=2, seed=5)
    assert torch.equal(twin._load()[0], dm._load()[0])
    other_seed = SyntheticDataModule(num_samples=96, num_classes=3, image_size=8, in_chans=2, seed=6)
    assert not torch.equal(other_seed._load()[0], dm._load()[0])
    assert sum(len(y) for _, y in dm.calibration_batches()) == 72  # clamped to the train split
    with pytest.raises(ValueError, match="noise must be >= 0"):
        SyntheticDataModule(noise=-1.0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 8"):
        SyntheticDataModule(num_samples=4, num_classes=4)


def test_synthetic_task_is_learnable() -> None:
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_samples=256, num_classes=4, image_size=8, batch_size=32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for x, y in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in dm.val_dataloader())
    assert correct / len(dm.split_indices().val) > 0.9


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_split_and_batches(folder: Path) -> None:
    dm = ImageFolderDataModule(str(folder), val_per_class=3, batch_size=8, seed=1)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (3, 3, 32)
    assert dm.classes == CLASSES
    split = dm.split_indices()
    assert (len(split.train), len(split.val)) == (27, 9)
    assert not set(split.train) & set(split.val)
    assert Counter(dm.samples[i][1] for i in split.val) == {0: 3, 1: 3, 2: 3}
    assert split == ImageFolderDataModule(str(folder), val_per_class=3, seed=1).split_indices()
    assert split != ImageFolderDataModule(str(folder), val_per_class=3, seed=2).split_indices()
    by_fraction = ImageFolderDataModule(str(folder), val_fraction=0.25).split_indices()
    assert len(by_fraction.val) == 9
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    pixels = x * std + mean  # undo Normalize: back in [0, 1]
    assert pixels.min() >= -1e-5
    assert pixels.max() <= 1 + 1e-5
    assert sum(len(y) for _, y in dm.train_dataloader()) == 27
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), torch.cat([y for _, y in dm.val_dataloader()]))


def test_imagefolder_cache_matches_disk_and_calibration_is_unaugmented(folder: Path) -> None:
    lazy = ImageFolderDataModule(str(folder), val_per_class=2, batch_size=6)
    cached = ImageFolderDataModule(str(folder), val_per_class=2, batch_size=6, cache_in_memory=True)
    for a, b in zip(lazy.val_dataloader(), cached.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])
    calib = cached.calibration_batches(num_images=9, batch_size=4)
    assert [len(y) for _, y in calib] == [4, 4, 1]
    assert Counter(torch.cat([y for _, y in calib]).tolist()) == {0: 3, 1: 3, 2: 3}
    lazy_calib = lazy.calibration_batches(num_images=9, batch_size=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib, lazy_calib, strict=True))
    idx = cached.calibration_indices(9)
    val_tf = cached.val_set.transform  # type: ignore[union-attr]
    from lightning_dbq.data.imagefolder import decode_rgb

    assert torch.equal(calib[0][0][0], val_tf(decode_rgb(cached.samples[idx[0]][0])))
    assert set(idx) <= set(cached.split_indices().train)
    train_set = cached.train_set
    views = torch.stack([train_set[0][0] for _ in range(12)])  # type: ignore[index]
    assert not all(torch.equal(v, views[0]) for v in views)  # crop / flip active


def test_imagefolder_train_subset_and_test_root(folder: Path) -> None:
    dm = ImageFolderDataModule(str(folder), val_per_class=2, train_subset=6, test_root=str(folder), augment=False)
    split = dm.split_indices()
    assert Counter(dm.samples[i][1] for i in split.train) == {0: 2, 1: 2, 2: 2}
    assert not set(split.train) & set(split.val)
    assert sum(len(y) for _, y in dm.test_dataloader()) == 3 * PER_CLASS
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 32, 32)


def test_imagefolder_resizes_other_sizes(folder: Path) -> None:
    dm = ImageFolderDataModule(str(folder), val_per_class=1, image_size=20, cache_in_memory=True, batch_size=64)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (33, 3, 20, 20)


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"root: no such directory '{missing}'"):
        ImageFolderDataModule(str(missing))
    with pytest.raises(FileNotFoundError, match="root: no class folders found"):
        ImageFolderDataModule(str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\), got 1.5"),
        ({"image_size": 0}, "image_size must be an integer >= 1"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"mean": (0.5,)}, "mean and std must have 3 values"),
    ],
)
def test_imagefolder_bad_args(folder: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(str(folder), **kwargs)  # type: ignore[arg-type]


def test_imagefolder_test_root_class_mismatch(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "zebra").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "zebra" / "0.png")
    match = rf"test_root classes \['zebra'\] differ from root classes .*test_root='{tmp_path}', root='{folder}'"
    with pytest.raises(ValueError, match=match):  # fails at construction, before any training
        ImageFolderDataModule(str(folder), val_per_class=2, test_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="test_root: no such directory"):
        ImageFolderDataModule(str(folder), test_root=str(tmp_path / "nope"))


def test_imagefolder_test_root_is_read_by_test_dataloader(folder: Path, tmp_path: Path) -> None:
    for label, name in enumerate(CLASSES):  # a different, smaller tree with the same class folders
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((32, 32, 3), 40 * label, dtype=np.uint8)).save(tmp_path / name / "0.png")
    dm = ImageFolderDataModule(str(folder), val_per_class=2, test_root=str(tmp_path), batch_size=8)
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == [0, 1, 2]
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    expected = (torch.arange(3).view(3, 1, 1, 1) * 40 / 255 - mean) / std
    assert torch.allclose(x, expected.expand(3, 3, 32, 32), atol=1e-6)  # un-augmented test images
    assert sum(len(y) for _, y in dm.val_dataloader()) == 6  # validation still comes from root


# ---------------------------------------------------------------- cifar10 (no network, no real data)


def test_cifar10_missing_data_says_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found under root=.*pass download=True"):
        CIFAR10DataModule(str(tmp_path))


def test_cifar10_corrupt_data_says_download(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in cifar10_mod._FILES:
        (folder / name).write_bytes(pickle.dumps({"data": [], "labels": []}))
    dm = CIFAR10DataModule(str(tmp_path), val_per_class=5)  # files exist: checksums are checked on load
    with pytest.raises(FileNotFoundError, match="pass download=True"):
        dm.setup()


class _FakeCIFAR10:
    """Stands in for torchvision's CIFAR10: 20 images per class, HWC uint8."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        n = 200 if train else 50
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]


def test_cifar10_split_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar10_mod, "CIFAR10", _FakeCIFAR10)
    monkeypatch.setattr(cifar10_mod, "_missing_files", lambda root: [])
    dm = CIFAR10DataModule(str(tmp_path), val_per_class=5, batch_size=32, train_subset=100)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 3, 32)
    split = dm.split_indices()
    assert (len(split.train), len(split.val)) == (100, 50)
    assert Counter(i % 10 for i in split.train) == dict.fromkeys(range(10), 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32)
    assert y.dtype == torch.int64
    assert sum(len(y) for _, y in dm.test_dataloader()) == 50  # official test split
    assert sum(len(y) for _, y in dm.val_dataloader()) == 50
    calib = dm.calibration_batches(num_images=20, batch_size=20)
    assert torch.equal(calib[0][0], dm.calibration_batches(num_images=20, batch_size=20)[0][0])
    on_val = CIFAR10DataModule(str(tmp_path), val_per_class=5, official_test=False)
    assert torch.equal(torch.cat([y for _, y in on_val.test_dataloader()]), torch.tensor(split.val) % 10)


# ---------------------------------------------------------------- Lightning


class _TinyClassifier(pl.LightningModule):
    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, num_classes))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_and_test_with_datamodule(tmp_path: Path) -> None:
    dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=16)
    model = _TinyClassifier(dm.in_chans * dm.image_size**2, dm.num_classes)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["val_loss"] > 0
    assert dm.hparams["num_samples"] == 64
