"""The GPU check's data path and planning (CPU tests): uint8 cache, on-device augmentation, epoch planning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from experiments.gpu.check import results_path
from experiments.gpu.data import DeviceBatches, build_cache, crop_flip, load_cache
from experiments.gpu.study import ARMS, plan_epochs
from lightning_dbq.data.imagefolder import decode_rgb


def test_crop_flip_equals_torchvision_image_by_image() -> None:
    images = torch.randint(0, 256, (40, 3, 10, 12), dtype=torch.uint8)
    out = crop_flip(images, 3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order
    top, left = torch.randint(0, 7, (40,), generator=gen), torch.randint(0, 7, (40,), generator=gen)
    flip = torch.rand(40, generator=gen) < 0.5
    assert 0 < int(flip.sum()) < 40
    for i in range(40):
        ref = TF.crop(TF.pad(images[i], [3]), int(top[i]), int(left[i]), 10, 12)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref), i


def test_device_batches_cover_the_data_once_per_epoch_and_normalise() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    targets = torch.arange(10)
    val = DeviceBatches(images, targets, 4, train=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    batches = list(val)
    assert len(val) == len(batches) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.allclose(torch.cat([x for x, _ in batches])[:, 0, 0, 0], targets.float() / 255)
    train = DeviceBatches(images, targets, 4, train=True, seed=1)
    e0, e1 = (torch.cat([y for _, y in train]) for _ in range(2))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(10)) and not torch.equal(e0, e1)
    train.epoch = 0
    assert torch.equal(torch.cat([y for _, y in train]), e0)  # epoch e is a function of (seed, e)


def test_device_batches_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="images: expected a non-empty"):
        DeviceBatches(torch.zeros(2, 3, 4, 4), torch.zeros(2), 2, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceBatches(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2), 0, train=True)


def _tree(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_cache_round_trip_equals_the_decoded_files(tmp_path: Path) -> None:
    _tree(tmp_path / "tree")
    meta = build_cache(tmp_path / "tree", tmp_path / "cache", val_per_class=2, size=8)
    images, targets, train, val, loaded = load_cache(tmp_path / "cache")
    assert loaded == meta and len(train) == 8 and len(val) == 4 and not set(train) & set(val)
    files = sorted((tmp_path / "tree").glob("*/*.png"))  # ImageFolder order: class folder, then file name
    assert len(images) == len(files) == 12
    for row, f in enumerate(files):
        assert torch.equal(images[row], decode_rgb(str(f))) and int(targets[row]) == (f.parent.name == "dog")


def test_load_cache_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no uint8 image cache"):
        load_cache(tmp_path)
    _tree(tmp_path / "tree")
    build_cache(tmp_path / "tree", tmp_path / "c", val_per_class=2, size=8)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    offsets = np.load(tmp_path / "c" / "offsets.npy")
    np.save(tmp_path / "c" / "offsets.npy", offsets.astype(np.float32))
    with pytest.raises(ValueError, match="expected a 1-d int64 array"):
        load_cache(tmp_path / "c")
    np.save(tmp_path / "c" / "offsets.npy", offsets[:-1])
    with pytest.raises(ValueError, match="offsets.npy must rise"):
        load_cache(tmp_path / "c")
    np.save(tmp_path / "c" / "offsets.npy", offsets)
    (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, "val": [99]}))
    with pytest.raises(ValueError, match="'val' must be a list of row indices"):
        load_cache(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, "extra": 1}))
    with pytest.raises(ValueError, match="expected the keys"):
        load_cache(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    files = np.load(tmp_path / "c" / "files.npy")
    files[offsets[3] : offsets[4]] = 0  # one file's bytes destroyed
    np.save(tmp_path / "c" / "files.npy", files)
    with pytest.raises(ValueError, match="cannot decode cache row 3"):
        load_cache(tmp_path / "c")


@pytest.mark.parametrize(("budget", "t_fp", "t_q"), [(480, 2.0, 3.0), (100, 1.0, 1.0), (1, 5.0, 5.0), (5000, 0.7, 2.9)])
def test_plan_epochs_is_the_largest_fitting_e(budget: float, t_fp: float, t_q: float) -> None:
    def cost(e: int) -> float:  # brute force over the arms, written out
        total = 0.0
        for arm in ARMS:
            total += arm.epoch_factor * e * (t_fp if not arm.bits else len(arm.bits) * t_q)
        return total

    e = plan_epochs(budget, t_fp, t_q)
    fitting = [k for k in range(1, 1000) if cost(k) <= budget]
    assert e == (max(fitting) if fitting else 1)
    with pytest.raises(ValueError, match="epoch times must be > 0"):
        plan_epochs(10, 0.0, 1.0)


def test_results_path_per_device_and_smoke() -> None:
    assert results_path("NVIDIA H200", False).name == "gpu_check_nvidia_h200.json"
    assert results_path("NVIDIA H200", True).parts[-2:] == ("smoke", "gpu_check.json")
