"""API misuse: bit lists, prepare/set_bits/save_int/load_int/calibrate called wrongly, bad checkpoints. Each case
asserts the exception type and that the message names the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import lightning_dbq as dbq
from lightning_dbq.training import DBQModule
from tests.helpers.tiny import TinyNet
from tests.reliability.helpers import make_artifact

BAD_BITS: list[tuple[Any, type[Exception], str]] = [
    (8, TypeError, "list of integers"),
    ("8,4", TypeError, "list of integers"),
    ([], ValueError, "must not be empty"),
    ([8, 8], ValueError, "duplicates"),
    ([9, 4], ValueError, r"\[2, 8\]"),
    ([8, 1], ValueError, r"\[2, 8\]"),
    ([8, 0], ValueError, r"\[2, 8\]"),
    ([8, -2], ValueError, r"\[2, 8\]"),
    ([8.0, 4], TypeError, "integers"),
    (["8", 4], TypeError, "integers"),
    ([True, 4], TypeError, "integers"),
    ([None], TypeError, "integers"),
    ({8: 1}, TypeError, "integers|list"),
]


@pytest.mark.parametrize(("bits", "exc", "match"), BAD_BITS, ids=[repr(b[0]) for b in BAD_BITS])
def test_prepare_rejects_bad_bit_lists(bits: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        dbq.prepare(TinyNet(), bits=bits)


def _model() -> torch.nn.Module:
    m = dbq.prepare(TinyNet(), bits=[8, 4, 2])
    m(torch.randn(2, 3, 8, 8))
    return m


BAD_SET_BITS: list[tuple[Any, type[Exception], str]] = [
    (6, ValueError, "candidate bits"),
    (0, ValueError, "candidate bits"),
    ("4", ValueError, "candidate bits"),
    (4.0, ValueError, "candidate bits"),
    (True, ValueError, "candidate bits"),
    ({"conv2": 3}, ValueError, "candidate bits"),
    ({"nope": 4}, ValueError, "unknown layer"),
    ({"conv1": 4}, ValueError, "unknown layer"),  # first layer stays FP: not a quantized layer
    ({"conv2": None}, ValueError, "candidate bits"),
]


@pytest.mark.parametrize(("bits", "exc", "match"), BAD_SET_BITS, ids=[repr(b[0]) for b in BAD_SET_BITS])
def test_set_bits_rejects_bad_configs(bits: Any, exc: type[Exception], match: str) -> None:
    m = _model()
    before = dbq.bit_config(m)
    with pytest.raises(exc, match=match):
        dbq.set_bits(m, bits)
    assert dbq.bit_config(m) == before  # nothing half-applied


def test_prepare_misuse() -> None:
    with pytest.raises(TypeError, match=r"skip=\['conv2'\]"):
        dbq.prepare(TinyNet(), bits=[8, 2], skip="conv2")
    with pytest.raises(ValueError, match="no quantizable layer"):
        dbq.prepare(TinyNet(), bits=[8, 2], skip=["*"])
    m = dbq.prepare(TinyNet(), bits=[8, 2])
    with pytest.raises(ValueError, match="already prepared"):
        dbq.prepare(m, bits=[8, 4])
    with pytest.raises(ValueError, match="kernel"):
        dbq.prepare(TinyNet(), bits=[8, 2], kernel="cuda-magic")
    with pytest.raises(ValueError, match="weight_mode"):
        dbq.prepare(TinyNet(), bits=[8, 2], weight_mode="nested")
    with pytest.raises(ValueError, match="transitional_norm=True needs per_bit_norm=True"):
        dbq.prepare(TinyNet(), bits=[8, 2], transitional_norm=True, per_bit_norm=False)
    with pytest.raises(ValueError, match="not prepared"):
        dbq.set_bits(TinyNet(), 4)
    with pytest.raises(ValueError, match="not prepared"):
        dbq.bit_config(TinyNet())


def test_save_int_misuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not prepared"):
        dbq.save_int(TinyNet(), tmp_path / "x.dbq.safetensors")
    cold = dbq.prepare(TinyNet(), bits=[8, 2])  # never saw a batch
    with pytest.raises(dbq.ArtifactError, match=r"never initialised: \['conv2.act_quant', 'conv3.act_quant'\]"):
        dbq.save_int(cold, tmp_path / "x.dbq.safetensors", model_name="cifar_resnet20")
    dbq.calibrate(cold, [torch.randn(2, 3, 8, 8)])
    dbq.save_int(cold, tmp_path / "x.dbq.safetensors", model_name="cifar_resnet20")
    nan = _model()
    with torch.no_grad():
        nan.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(dbq.ArtifactError, match=r"NaN/inf.*conv2.weight"):
        dbq.save_int(nan, tmp_path / "y.dbq.safetensors", model_name="cifar_resnet20")
    assert not (tmp_path / "y.dbq.safetensors").exists()
    for name in ("hf-hub:org/m", "https://x/y", "../m", "no_such_model_xyz"):
        with pytest.raises(dbq.ArtifactError, match="model.name"):
            dbq.save_int(_model(), tmp_path / "z.dbq.safetensors", model_name=name)
    with pytest.raises(dbq.ArtifactError, match="model.kwargs.checkpoint_path"):
        dbq.save_int(_model(), tmp_path / "z.dbq.safetensors", model_name="cifar_resnet20",
                     model_kwargs={"checkpoint_path": "/tmp/w.pth"})  # fmt: skip
    with pytest.raises(dbq.ArtifactError, match="extra"):
        dbq.save_int(_model(), tmp_path / "z.dbq.safetensors", model_name="cifar_resnet20",
                     extra={"acc": float("nan")})  # fmt: skip
    assert not (tmp_path / "z.dbq.safetensors").exists()


def test_calibrate_misuse() -> None:
    with pytest.raises(ValueError, match="not prepared"):
        dbq.calibrate(TinyNet(), [torch.randn(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="empty"):
        dbq.calibrate(dbq.prepare(TinyNet(), bits=[8, 2]), [])
    m = dbq.prepare(TinyNet(), bits=[8, 4, 2]).train()
    dbq.set_bits(m, {"conv2": 4})
    dbq.calibrate(m, [(torch.randn(2, 3, 8, 8), torch.zeros(2))])
    assert m.training and dbq.bit_config(m) == {"conv2": 4, "conv3": 8}  # mode and config restored


def test_load_int_misuse(tmp_path: Path) -> None:
    path = make_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such artifact"):
        dbq.load_int(tmp_path / "missing.dbq.safetensors")
    with pytest.raises(dbq.ArtifactError, match="prepared|do not match|do not fit"):
        dbq.load_int(path, model=timm.create_model("resnet18", num_classes=4))  # wrong architecture
    with pytest.raises(dbq.ArtifactError, match="do not match|do not fit"):
        dbq.load_int(path, model=timm.create_model("cifar_resnet20", num_classes=7))  # wrong head
    with pytest.raises(dbq.ArtifactError, match="already prepared|cannot be prepared"):
        dbq.load_int(path, model=dbq.create_model("cifar_resnet20", bits=[4, 2], num_classes=4))
    for content in (b"", b"hello world", b"\x00" * 64, b"PK\x03\x04 not a zip"):
        bad = tmp_path / "bad.dbq.safetensors"
        bad.write_bytes(content)
        with pytest.raises(dbq.ArtifactError, match="not a readable safetensors file"):
            dbq.load_int(bad)
    with pytest.raises(dbq.ArtifactError):
        dbq.load_int(tmp_path)  # a folder, not a file


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty file"),
        (b"just text\n", "not a readable torch checkpoint"),
        (b"\x80\x04\x95garbage", "not a readable torch checkpoint"),
    ],  # fmt: skip
)
def test_bad_init_checkpoints_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], init_checkpoint=str(bad))
    assert "bad.ckpt" in str(info.value)


def test_init_checkpoint_refuses_artifacts_lists_and_missing_files(tmp_path: Path) -> None:
    art = make_artifact(tmp_path)
    with pytest.raises(ValueError, match="safetensors file; use lightning_dbq.load_int"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], init_checkpoint=str(art))
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(ValueError, match="holds a list"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], init_checkpoint=str(listed))
    with pytest.raises(FileNotFoundError, match="no such file"):
        DBQModule(TinyNet(), num_classes=4, bits=[8, 2], init_checkpoint=str(tmp_path / "nope.ckpt"))


def _jpegs(folder: Path, classes: list[str], n: int = 3) -> None:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            pixels = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8, generator=rng).numpy()
            Image.fromarray(pixels).save(folder / c / f"{i}.jpg")


def test_data_folder_faults(tmp_path: Path) -> None:
    from lightning_dbq.data import ImageFolderDataModule
    from lightning_dbq.data.imagefolder import decode_rgb

    _jpegs(tmp_path / "one", ["only"])
    with pytest.raises(ValueError, match=r"root: .*one.* has 1 class folder\(s\) \['only'\]; .*at least 2"):
        ImageFolderDataModule(tmp_path / "one", image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataModule(tmp_path / "empty", image_size=16)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataModule(tmp_path / "missing", image_size=16)
    _jpegs(tmp_path / "two", ["a", "b"])
    bad = tmp_path / "two" / "b" / "1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"truncated JPEG .*1\.jpg"):
        decode_rgb(str(bad))
    text = tmp_path / "two" / "a" / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode image file .*notes\.jpg"):
        decode_rgb(str(text))
    assert decode_rgb(str(tmp_path / "two" / "a" / "0.jpg")).shape == (3, 16, 16)


def test_search_cli_refuses_bad_checkpoint_files(tmp_path: Path) -> None:
    from lightning_dbq.cli.search import load_model
    from lightning_dbq.cli.validate import ConfigError

    for name, content in (("empty.ckpt", b""), ("text.ckpt", b"epoch=3\n"), ("junk.ckpt", b"\x80\x04garbage")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ConfigError, match=rf"checkpoint: .*{name}.* neither an int artifact"):
            load_model(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "missing.ckpt"))
