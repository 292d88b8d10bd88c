"""dbq-export: every format from an int artifact and a DBQModule checkpoint, and every bad input's ConfigError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import lightning_dbq as dbq
from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.export import export
from lightning_dbq.cli.validate import ConfigError
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.quant.convert import freeze
from lightning_dbq.search.pipeline import layer_names
from tests.helpers.ort import ort_session

ort = pytest.importorskip("onnxruntime")

DATA = ["data=synthetic", "data.image_size=8", "data.num_samples=96"]
PREPROCESSING = {"mean": [0.0] * 3, "std": [1.0] * 3, "image_size": 8, "interpolation": "none", "channels": 3}
CLASSES = ["cat", "dog", "eel", "fox"]


def compose_cli(name: str, overrides: list[str]):
    """A composed ``export`` / ``eval`` / ``search`` config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


def make_model(seed: int = 0) -> torch.nn.Module:
    """A cifar_resnet20 (bits [8, 4, 2], 4 classes) with its activation scales set, latent weights off the grid."""
    torch.manual_seed(seed)
    model = dbq.create_model("cifar_resnet20", bits=[8, 4, 2], num_classes=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))
    return model.eval()


def make_served(folder: Path, preprocessing: dict | None = PREPROCESSING) -> tuple[torch.nn.Module, Path, Path]:
    """``(model, artifact, pareto.json)``: an artifact with preprocessing and class names, and a 2-row pareto.json
    (row 0 mixed 4/2 bits, row 1 all 8 bits)."""
    model = make_model()
    artifact = dbq.save_int(model, folder / "r20.dbq.safetensors", preprocessing=preprocessing, class_names=CLASSES)
    names = layer_names(model)
    mixed = {n: (2 if i % 2 else 4) for i, n in enumerate(names)}
    pareto = folder / "pareto.json"
    pareto.write_text(json.dumps([{"avg_bits": 3.0, "acc": 0.5, "config": mixed},
                                  {"avg_bits": 8.0, "acc": 0.6, "config": dict.fromkeys(names, 8)}]))  # fmt: skip
    return dbq.load_int(artifact), artifact, pareto


def make_checkpoint(folder: Path) -> Path:
    """A real DBQModule ``.ckpt`` (one tiny fit on synthetic data, then ``trainer.save_checkpoint``)."""
    from lightning_dbq.training import DBQModule

    pl.seed_everything(0)
    dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=16)
    module = DBQModule("cifar_resnet20", num_classes=4, bits=[8, 4, 2], lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", strategy="dbq", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(folder))  # fmt: skip
    trainer.fit(module, dm)
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    return make_served(tmp_path_factory.mktemp("served"))


_session = ort_session


def test_onnx_export_runs_in_onnxruntime_and_matches_the_frozen_model(served, tmp_path: Path, report) -> None:
    model, artifact, _ = served
    out = tmp_path / "m.onnx"
    summary = export(compose_cli("export", [f"checkpoint={artifact}", "bits=4", "format=onnx", f"output={out}",
                                            *DATA]), str(tmp_path))  # fmt: skip
    assert summary["file"] == str(out) and summary["bytes"] == out.stat().st_size > 0
    assert summary["format"] == "onnx" and summary["onnx_mode"] == "exact" and summary["avg_bits"] == 4.0
    assert summary["input_shape"] == [1, 3, 8, 8]  # from the artifact's preprocessing
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        ref = freeze(model, 4)(x)
    got = torch.from_numpy(_session(out).run(None, {"input": x.numpy()})[0])
    agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
    assert agree >= 0.95  # ONNX rounds activation ties half to even (tests/export measures it)
    report(f"dbq-export onnx w4 vs freeze: top-1 agreement {agree:.3f}, max |dlogit| {(ref - got).abs().max():.3g}")


def test_torchscript_export_of_a_pareto_row_is_the_frozen_model(served, tmp_path: Path) -> None:
    model, artifact, pareto = served
    summary = export(compose_cli("export", [f"checkpoint={artifact}", f"config={pareto}@0", "format=torchscript",
                                            *DATA]), str(tmp_path))  # fmt: skip
    out = Path(summary["file"])
    assert out == tmp_path / "model_pareto0.pt"  # default: in the run dir
    config = json.loads(pareto.read_text())[0]["config"]
    assert summary["config"] == config and summary["avg_bits"] == pytest.approx(
        sum(model.get_submodule(n).weight.numel() * b for n, b in config.items())
        / sum(model.get_submodule(n).weight.numel() for n in config)
    )
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(str(out))(x), freeze(model, config)(x))


def test_dbq_export_is_a_slim_artifact_with_its_metadata(served, tmp_path: Path) -> None:
    model, artifact, pareto = served
    summary = export(compose_cli("export", [f"checkpoint={artifact}", f"config='{pareto}#0'", "format=dbq",
                                            *DATA]), str(tmp_path))  # fmt: skip
    out = Path(summary["file"])
    assert out.name == "model_pareto0.dbq.safetensors" and out.stat().st_size < artifact.stat().st_size
    manifest = dbq.read_manifest(out)
    config = json.loads(pareto.read_text())[0]["config"]
    assert manifest["preprocessing"] == PREPROCESSING and manifest["class_names"] == CLASSES
    assert manifest["config"] == config
    slim = dbq.load_int(out)
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(freeze(slim, config)(x), freeze(model, config)(x))


def test_export_from_a_checkpoint_with_the_data_configs_metadata(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path)
    summary = export(compose_cli("export", [f"checkpoint={ckpt}", "bits=2", "format=dbq", *DATA]), str(tmp_path))
    manifest = dbq.read_manifest(summary["file"])
    assert manifest["preprocessing"]["image_size"] == 8 and manifest["class_names"] == [f"class_{i}" for i in range(4)]
    assert set(manifest["config"].values()) == {2}


def test_onnx_mode_and_calibration_are_passed_through(served, tmp_path: Path, monkeypatch) -> None:
    import lightning_dbq.export.onnx as onnx_export

    seen = []
    unavailable = []

    def fake(model, config, path, example_input, *, mode="exact", calibration_data=None, opset=17):
        seen.append((mode, None if calibration_data is None else [tuple(x.shape) for x in calibration_data]))
        if unavailable:
            raise NotImplementedError("integer mode: not implemented yet")
        Path(path).write_bytes(b"onnx")
        return Path(path)

    monkeypatch.setattr(onnx_export, "export_onnx", fake)
    _, artifact, _ = served
    base = [f"checkpoint={artifact}", "bits=8", *DATA]
    export(compose_cli("export", [*base, "onnx_mode=exact"]), str(tmp_path))
    export(compose_cli("export", [*base, "onnx_mode=integer", "calibration_images=40"]), str(tmp_path))
    assert seen[0] == ("exact", None)
    assert seen[1][0] == "integer" and sum(s[0] for s in seen[1][1]) == 40  # training images, not the test split
    assert all(s[1:] == (3, 8, 8) for s in seen[1][1])
    unavailable.append(True)
    with pytest.raises(ConfigError, match=r"onnx_mode: 'integer' is not available .*use onnx_mode=exact"):
        export(compose_cli("export", [*base, "onnx_mode=integer"]), str(tmp_path))


def _bad_inputs(folder: Path, artifact: Path, pareto: Path, names: list[str]) -> list[tuple[list[str], str]]:
    text = folder / "notes.ckpt"
    text.write_text("epoch=3\n")
    fewer = folder / "fewer.json"
    fewer.write_text(json.dumps([{"config": {n: 4 for n in names[1:]}}]))
    extra = folder / "extra.json"
    extra.write_text(json.dumps([{"config": {**dict.fromkeys(names, 4), "fc.weight": 4}}]))
    art = f"checkpoint={artifact}"
    return [
        ([art, "bits=6"], r"^bits: 6 is not one of the model's bits \[8, 4, 2\]"),
        ([art, f"config={fewer}@0"], rf"^config: layer '{names[0]}' of the model is missing from .*fewer.json' row 0"),
        ([art, f"config={extra}@0"], r"^config: .*extra.json' row 0 names 'fc.weight', which is not a quantized layer"),
        ([art, f"config={pareto}@2"], r"^config: row 2 is out of range: .*pareto.json' has 2 rows \(0 to 1\)"),
        ([art, f"config={pareto}"], r"^config: got .*; expected PATH#ROW"),
        ([art, f"config={folder}/none.json@0"], r"^config: .*none.json' does not exist"),
        ([f"checkpoint={folder}/missing.ckpt", "bits=4"], r"^checkpoint: .*missing.ckpt' does not exist"),
        ([f"checkpoint={text}", "bits=4"], r"^checkpoint: .*notes.ckpt' is neither an int artifact"),
        ([art, "bits=4", "format=tflite"], r"^format: got 'tflite'; allowed: \['onnx', 'torchscript', 'dbq'\]"),
        ([art, "bits=4", "onnx_mode=fast"], r"^onnx_mode: got 'fast'; allowed: \['exact', 'integer'\]"),
        ([art, "bits=4", f"config={pareto}@0"], r"^bits, config: give exactly one .*got both"),
        ([art], r"^bits, config: give exactly one .*got neither"),
        (["bits=4"], r"^checkpoint: missing; give checkpoint=PATH"),
    ]


def test_bad_inputs_give_config_errors_naming_the_field(served, tmp_path: Path) -> None:
    model, artifact, pareto = served
    for overrides, match in _bad_inputs(tmp_path, artifact, pareto, layer_names(model)):
        with pytest.raises(ConfigError, match=match):
            export(compose_cli("export", [*overrides, *DATA]), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_console_script_end_to_end(served, tmp_path: Path) -> None:
    _, artifact, pareto = served
    exe = Path(sys.executable).with_name("dbq-export")
    cmd = [str(exe), f"checkpoint={artifact}", f"config='{pareto}#1'", "format=onnx", *DATA,
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model_pareto1.onnx").stat().st_size > 0
    assert "pareto1: 8.00 average bits" in proc.stdout
