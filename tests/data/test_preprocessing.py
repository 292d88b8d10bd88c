"""Data modules' ``preprocessing`` / ``class_names`` and the serving-side ``apply_preprocessing``.

References: a NumPy re-implementation of antialiased (PIL-style) separable resampling, shorter-side resize and
center crop, and the data modules' own evaluation pipelines (which ``apply_preprocessing`` must reproduce exactly).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_dbq as dbq
import lightning_dbq.data as data_pkg
import lightning_dbq.data.cifar10 as cifar10_mod
from lightning_dbq.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    apply_preprocessing,
)
from lightning_dbq.data._base import image_transform, resize_center_crop
from lightning_dbq.quant.artifact_check import check_preprocessing

# ---------------------------------------------------------------- NumPy reference


def _kernel(mode: str) -> tuple[float, Any]:
    if mode == "bilinear":
        return 1.0, lambda x: np.maximum(0.0, 1.0 - np.abs(x))
    a = -0.5  # PIL's (and torch's antialiased) bicubic

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    return 2.0, cubic


def _resize_axis(arr: np.ndarray, axis: int, out: int, mode: str) -> np.ndarray:
    """Antialiased separable resampling along one axis (PIL's ImagingResample weights)."""
    size = arr.shape[axis]
    scale = size / out
    if mode == "nearest":
        idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(scale)).astype(int), size - 1)
        return np.take(arr, idx, axis=axis)
    support, f = _kernel(mode)
    fscale = max(scale, 1.0)
    support *= fscale
    weights = np.zeros((out, size))
    for i in range(out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size)
        w = f((np.arange(lo, hi) - center + 0.5) / fscale)
        weights[i, lo:hi] = w / w.sum()
    return np.moveaxis(np.tensordot(weights, np.moveaxis(arr, axis, 0), axes=1), 0, axis)


def _reference(image: np.ndarray, pre: dict[str, Any], levels: bool = False) -> np.ndarray:
    """(C, H, W) float image in [0, 1] -> shorter side resized, center-cropped, normalised (float64).

    ``levels``: a uint8 image (values k/255) resized like PIL / torch's uint8 kernels: width pass, then height pass,
    each rounded and clipped to 0..255 (bicubic overshoots, so the intermediate clip matters).
    """
    size = pre["image_size"]
    x = image.astype(np.float64)
    _, h, w = x.shape
    if (h, w) != (size, size):
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        nh, nw = (size, new_long) if h <= w else (new_long, size)
        for axis, n in ((2, nw), (1, nh)):
            x = _resize_axis(x, axis, n, pre["interpolation"])
            if levels:
                x = np.clip(np.round(x * 255), 0, 255) / 255
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[:, top : top + size, left : left + size]
    mean = np.array(pre["mean"]).reshape(-1, 1, 1)
    std = np.array(pre["std"]).reshape(-1, 1, 1)
    return (x - mean) / std


def _pre(mode: str, size: int, channels: int = 3) -> dict[str, Any]:
    mean = [0.4, 0.5, 0.3][:channels]
    std = [0.2, 0.25, 0.5][:channels]
    return {"mean": mean, "std": std, "image_size": size, "interpolation": mode, "channels": channels}


SHAPES = [(36, 40, 24), (20, 13, 32), (32, 32, 32), (17, 17, 8), (9, 30, 12)]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize(("h", "w", "size"), SHAPES)
def test_float_images_match_the_numpy_reference(mode: str, h: int, w: int, size: int) -> None:
    rng = np.random.default_rng(h * 100 + w)
    image = rng.random((3, h, w), dtype=np.float32)
    pre = _pre(mode, size)
    got = apply_preprocessing(torch.from_numpy(image), pre)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _reference(image, pre), rtol=0, atol=2e-5)
    batch = apply_preprocessing(np.stack([image, image[:, ::-1].copy()]), pre)  # NumPy input, a batch
    assert batch.shape == (2, 3, size, size)
    assert torch.equal(batch[0], got)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize(("h", "w", "size"), SHAPES)
def test_uint8_images_within_one_level_of_the_reference(mode: str, h: int, w: int, size: int) -> None:
    image = np.random.default_rng(h + w).integers(0, 256, size=(3, h, w), dtype=np.uint8)
    pre = _pre(mode, size)
    got = apply_preprocessing(torch.from_numpy(image), pre).numpy()
    ref = _reference(image / 255.0, pre, levels=True)
    one_level = 1 / 255 / min(pre["std"]) + 1e-5
    np.testing.assert_allclose(got, ref, rtol=0, atol=one_level)


def test_normalisation_numbers() -> None:
    pre = {"mean": [0.5], "std": [0.25], "image_size": 2, "interpolation": "none", "channels": 1}
    x = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    expected = (np.array([[[0, 255], [51, 102]]]) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(apply_preprocessing(x, pre).numpy(), expected, atol=1e-6)
    floats = torch.tensor([[[0.0, 1.0], [0.2, 0.4]]])
    np.testing.assert_allclose(apply_preprocessing(floats, pre).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "pre", "match"),
    [
        (torch.zeros(1, 8, 8), _pre("bilinear", 8), r"1 channel\(s\).*channels=3"),
        (torch.zeros(3, 9, 8), _pre("none", 8), "interpolation='none' needs 8x8"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), _pre("bilinear", 8), "uint8.*or floating point"),
        (torch.zeros(8, 8), _pre("bilinear", 8), r"\(C, H, W\) or \(N, C, H, W\)"),
        (torch.zeros(3, 8, 8), {**_pre("bilinear", 8), "interpolation": "lanczos"}, "preprocessing.interpolation"),
        (torch.zeros(3, 8, 8), {**_pre("bilinear", 8), "std": [1, 0, 1]}, "preprocessing.std: must be positive"),
        (torch.zeros(3, 8, 8), {**_pre("bilinear", 8), "mean": [0.5]}, "preprocessing.mean: must have one value"),
        (torch.zeros(3, 8, 8), {**_pre("bilinear", 8), "image_size": 0}, "preprocessing.image_size"),
        (torch.zeros(3, 8, 8), {"mean": [0.5]}, "missing key"),
    ],
)
def test_apply_preprocessing_errors(images: torch.Tensor, pre: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_preprocessing(images, pre)


# ---------------------------------------------------------------- the data modules' own pipelines


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name in ["cat", "ant", "bee"]:
        (root / name).mkdir()
        for i in range(6):
            shape = (36, 44, 3) if i == 0 else (32, 32, 3)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_imagefolder_metadata_and_exact_eval_pipeline(folder: Path) -> None:
    dm = ImageFolderDataModule(str(folder), val_per_class=2, mean=(0.3, 0.4, 0.5), std=(0.2, 0.3, 0.4))
    assert dm.class_names == ["ant", "bee", "cat"]  # sorted folder names = class indices
    pre = dm.preprocessing
    assert pre == {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.3, 0.4], "image_size": 32, "interpolation": "bilinear",
                   "channels": 3}  # fmt: skip
    assert check_preprocessing("x", pre) == pre
    from lightning_dbq.data.imagefolder import decode_rgb

    dm.setup()
    assert dm.val_set is not None
    for i in range(len(dm.val_set)):
        x, _ = dm.val_set[i]
        path = dm.samples[dm.split_indices().val[i]][0]
        assert torch.equal(apply_preprocessing(decode_rgb(path), pre), x), path
    big = decode_rgb(str(folder / "cat" / "0.png"))
    assert torch.equal(
        apply_preprocessing(big, pre), image_transform(pre["mean"], pre["std"], size=32, resize=True)(big)
    )


def test_cifar10_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    class Fake:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            self.data = np.random.default_rng(int(train)).integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(100)]
            self.classes = list(names)

    monkeypatch.setattr(cifar10_mod, "CIFAR10", Fake)
    monkeypatch.setattr(cifar10_mod, "_missing_files", lambda root: [])
    dm = CIFAR10DataModule(str(tmp_path), val_per_class=2, image_size=24)
    assert dm.preprocessing["interpolation"] == "bilinear" and dm.preprocessing["image_size"] == 24
    assert dm.preprocessing["mean"] == list(dm.mean) and dm.preprocessing["channels"] == 3
    with pytest.raises(RuntimeError, match="available after setup"):
        _ = dm.class_names
    dm.setup()
    assert dm.class_names == names
    raw = torch.from_numpy(Fake("").data).permute(0, 3, 1, 2)[dm.split_indices().val[0]]
    x, _ = dm.val_set[0]  # type: ignore[index]
    assert torch.equal(apply_preprocessing(raw, dm.preprocessing), x)
    assert torch.equal(resize_center_crop(raw, 24), TF_resize_crop(raw, 24))


def TF_resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:  # noqa: N802 - mirrors torchvision names
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(F.resize(image, [size], antialias=True), [size, size])


def test_digits_metadata_reproduces_the_module_images() -> None:
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(batch_size=16, in_chans=3)
    assert dm.class_names == [str(i) for i in range(10)]
    pre = dm.preprocessing  # computed on demand from the train split
    assert pre["interpolation"] == "bilinear" and pre["image_size"] == 32 and pre["channels"] == 3
    assert pre["mean"] == [dm.mean[0]] * 3 and pre["std"][0] > 0  # type: ignore[index]
    dm.setup()
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0
    for i in dm.split_indices().val[:20]:
        x, _ = dm.val_set[dm.split_indices().val.index(i)]  # type: ignore[index]
        got = apply_preprocessing(raw[i].expand(3, -1, -1), pre)
        torch.testing.assert_close(got, x, rtol=0, atol=1e-5)


def test_synthetic_metadata() -> None:
    dm = SyntheticDataModule(num_samples=32, num_classes=4, image_size=8, in_chans=2)
    assert dm.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert dm.preprocessing == {"mean": [0.0, 0.0], "std": [1.0, 1.0], "image_size": 8, "interpolation": "none",
                                "channels": 2}  # fmt: skip
    x, _ = dm.calibration_batches(num_images=4)[0]
    assert torch.equal(apply_preprocessing(x, dm.preprocessing), x)  # identity: the module never normalises


def test_base_class_describes_nothing() -> None:
    from lightning_dbq.data._base import SplitDataModule

    with pytest.raises(NotImplementedError, match="preprocessing"):
        SplitDataModule.preprocessing.fget(SyntheticDataModule())  # type: ignore[attr-defined]


def test_package_names_resolve_and_preprocess_imports_no_lightning() -> None:
    for name in data_pkg.__all__:
        assert getattr(data_pkg, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = data_pkg.nope  # type: ignore[attr-defined]
    code = "import sys, lightning_dbq.data.preprocess; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- the report callback writes them


def _model(num_classes: int = 4) -> torch.nn.Module:
    from tests.helpers.tiny import TinyNet

    model = dbq.prepare(TinyNet(num_classes), bits=[8, 2])
    model(torch.randn(2, 3, 8, 8))
    return model.eval()


def test_report_metadata_from_the_datamodule(tmp_path: Path) -> None:
    from lightning_dbq.training.callbacks.report import _save_artifact, data_metadata

    dm = SyntheticDataModule(num_samples=32, num_classes=4, image_size=8)
    assert data_metadata(dm) == {"preprocessing": dm.preprocessing, "class_names": dm.class_names}
    assert data_metadata(None) == {}
    assert data_metadata(SimpleNamespace()) == {}  # a data module without them: nothing is guessed
    path = _save_artifact(_model(), tmp_path / "m.dbq.safetensors", {}, SimpleNamespace(datamodule=dm))  # type: ignore[arg-type]
    man = dbq.read_manifest(path)
    assert man["preprocessing"] == dm.preprocessing and man["class_names"] == dm.class_names
    # 4 names for a 10-class model: the artifact is still written, without them, and a warning says why
    with pytest.warns(UserWarning, match="class_names does not fit the model"):
        path = _save_artifact(_model(10), tmp_path / "w.dbq.safetensors", {}, SimpleNamespace(datamodule=dm))  # type: ignore[arg-type]
    man = dbq.read_manifest(path)
    assert man["class_names"] is None and man["preprocessing"] is None


def test_training_run_records_preprocessing(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_dbq.training import DBQModule, DBQReport
    from tests.helpers.tiny import TinyNet

    pl.seed_everything(0)
    dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=16)
    report_cb = DBQReport(str(tmp_path / "out"), plot=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="dbq", max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, callbacks=[report_cb])  # fmt: skip
    trainer.fit(DBQModule(TinyNet(), num_classes=4, bits=[8, 2]), dm)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    man = dbq.read_manifest(tmp_path / "out" / results["artifact"])
    assert man["preprocessing"] == dm.preprocessing and man["class_names"] == dm.class_names
    assert math.isfinite(results["val"]["w8a8"]["acc"])
