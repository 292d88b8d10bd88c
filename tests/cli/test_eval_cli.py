"""dbq-eval: accuracy/latency of uniform bits and pareto rows in torch and ONNX Runtime, preprocessing, errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dbq.cli.eval import run_eval
from lightning_dbq.cli.validate import ConfigError
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.search.pipeline import layer_names
from lightning_dbq.search.subnet import evaluate
from tests.cli.test_export_cli import CLASSES, DATA, PREPROCESSING, compose_cli, make_served

pytest.importorskip("onnxruntime")

FAST = [*DATA, "latency.warmup=0", "latency.batches=1", "latency.batch_size=4"]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    return make_served(tmp_path_factory.mktemp("served"))


def _val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    dm = SyntheticDataModule(num_samples=96, num_classes=4, image_size=8, in_chans=3, batch_size=32, seed=0)
    dm.setup()
    return list(dm.val_dataloader())


def test_torch_eval_writes_eval_json_plot_and_matches_evaluate(served, tmp_path: Path) -> None:
    model, artifact, pareto = served
    result = run_eval(compose_cli("eval", [f"checkpoint={artifact}", f"pareto={pareto}", *FAST]), str(tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == result and (tmp_path / "eval.png").stat().st_size > 1000
    assert result["runtime"] == "torch" and result["split"] == "val"  # synthetic data has no separate test split
    assert result["class_names"] == CLASSES and result["device"]["cpu"] and result["device"]["threads"] == 1
    assert result["preprocessing"]["used"] == "artifact" and not result["preprocessing"]["renormalized"]
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["w8a8", "w4a4", "w2a2", "pareto[0]", "pareto[1]"]
    val = _val_batches()
    n = sum(len(y) for _, y in val)
    configs = [8, 4, 2, *(r["config"] for r in json.loads(pareto.read_text()))]
    for row, config in zip(rows, configs, strict=True):
        assert row["n_images"] == n and row["latency_ms"] > 0
        assert row["acc"] == evaluate(model, config, val), row["name"]  # frozen == fake-quant, bit for bit
    assert rows[4]["avg_bits"] == 8.0 and 2.0 < rows[3]["avg_bits"] < 4.0


def test_onnx_eval_agrees_with_torch(served, tmp_path: Path, report) -> None:
    _, artifact, pareto = served
    base = [f"checkpoint={artifact}", f"pareto={pareto}", "bits=[8,2]", *FAST]
    torch_rows = run_eval(compose_cli("eval", base), str(tmp_path / "torch"))["rows"]
    result = run_eval(compose_cli("eval", [*base, "runtime=onnx", "onnx_mode=exact"]), str(tmp_path / "onnx"))
    assert result["runtime"] == "onnx" and result["onnx_mode"] == "exact" and "onnxruntime" in result["device"]
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["w8a8", "w2a2", "pareto[0]", "pareto[1]"] == [r["name"] for r in torch_rows]
    for a, b in zip(rows, torch_rows, strict=True):  # half-even ties may flip a rare prediction
        assert abs(a["acc"] - b["acc"]) <= 2 / a["n_images"], a["name"]
    report("dbq-eval onnx vs torch acc: " + ", ".join(f"{a['name']} {a['acc']:.3f}/{b['acc']:.3f}"
                                                      for a, b in zip(rows, torch_rows, strict=True)))  # fmt: skip


def test_normalisation_mismatch_warns_with_both_values_and_uses_the_artifacts(tmp_path: Path, caplog) -> None:
    pp = {**PREPROCESSING, "mean": [0.5] * 3, "std": [0.25] * 3}
    model, artifact, _ = make_served(tmp_path, preprocessing=pp)
    with caplog.at_level(logging.WARNING, logger="lightning_dbq.cli.eval"):
        result = run_eval(compose_cli("eval", [f"checkpoint={artifact}", "bits=[8]", *FAST]), str(tmp_path / "o"))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "PREPROCESSING MISMATCH" in msg and "mean=[0.5, 0.5, 0.5] std=[0.25, 0.25, 0.25]" in msg
    assert "mean=[0.0, 0.0, 0.0] std=[1.0, 1.0, 1.0]" in msg  # the data config's, named too
    assert result["preprocessing"]["renormalized"] is True
    val = [((x - 0.5) / 0.25, y) for x, y in _val_batches()]
    assert result["rows"][0]["acc"] == evaluate(model, 8, val)


def _jpegs(folder: Path, classes: list[str], n: int) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            pixels = torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8, generator=gen).numpy()
            Image.fromarray(pixels).save(folder / c / f"{i}.png")


def test_a_separate_test_tree_is_used_and_named(tmp_path: Path) -> None:
    pp = {
        **PREPROCESSING,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.247, 0.2435, 0.2616],
        "interpolation": "bilinear",
    }
    _, artifact, _ = make_served(tmp_path, preprocessing=pp)
    _jpegs(tmp_path / "train", CLASSES, 3)
    _jpegs(tmp_path / "test", CLASSES, 2)
    overrides = [f"checkpoint={artifact}", "bits=[4]", "data=imagefolder", f"data.root={tmp_path / 'train'}",
                 f"data.test_root={tmp_path / 'test'}", "data.image_size=8", "data.val_per_class=1",
                 "data.augment=false", "latency.warmup=0", "latency.batches=1"]  # fmt: skip
    result = run_eval(compose_cli("eval", overrides), str(tmp_path / "o"))
    assert result["split"] == "test" and result["rows"][0]["n_images"] == 8
    assert not result["preprocessing"]["renormalized"]  # imagefolder's default normalisation is the artifact's


def test_bad_inputs_give_config_errors_naming_the_field(served, tmp_path: Path) -> None:
    model, artifact, _ = served
    fewer = tmp_path / "fewer.json"
    names = layer_names(model)
    fewer.write_text(json.dumps([{"config": {n: 4 for n in names[1:]}}]))
    art = f"checkpoint={artifact}"
    cases = [
        ([art, "bits=[8,6]"], r"^bits: 6 is not one of the model's bits \[8, 4, 2\]"),
        ([art, "bits=[9]"], r"^bits: got \[9\]"),
        ([art, f"pareto={fewer}"], rf"^pareto: layer '{names[0]}' of the model is missing from .*fewer.json' row 0"),
        ([art, f"pareto={tmp_path}/none.json"], r"^pareto: .*none.json' does not exist"),
        ([art, "runtime=tvm"], r"^runtime: got 'tvm'; allowed: \['torch', 'onnx'\]"),
        ([art, "onnx_mode=fast"], r"^onnx_mode: got 'fast'; allowed: \['exact', 'integer'\]"),
        ([art, "data.image_size=16"], r"^data.image_size: the data gives 16, the artifact expects 8"),
        ([art, "+data.test_root=/tmp"], r"^data.test_root: only data=imagefolder reads a separate test tree"),
        ([art, "data.num_classes=3"], r"^data: SyntheticDataModule has 3 classes but the model outputs 4"),
        ([f"checkpoint={tmp_path}/missing.ckpt"], r"^checkpoint: .*missing.ckpt' does not exist"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            run_eval(compose_cli("eval", [*FAST, *overrides]), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_console_script_end_to_end(served, tmp_path: Path) -> None:
    _, artifact, pareto = served
    exe = Path(sys.executable).with_name("dbq-eval")
    cmd = [str(exe), f"checkpoint={artifact}", f"pareto={pareto}", "runtime=onnx", *FAST, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads((tmp_path / "eval.json").read_text())["rows"]) == 5
    assert "dbq-eval: onnx, val split" in proc.stdout


def test_a_mixed_slim_artifact_is_evaluated_at_its_stored_configuration(served, tmp_path: Path) -> None:
    from lightning_dbq.cli.export import export

    model, artifact, pareto = served
    slim = export(compose_cli("export", [f"checkpoint={artifact}", f"config={pareto}@0", "format=dbq", *DATA]),
                  str(tmp_path))["file"]  # fmt: skip
    result = run_eval(compose_cli("eval", [f"checkpoint={slim}", *FAST]), str(tmp_path / "o"))
    config = json.loads(pareto.read_text())[0]["config"]
    assert [(r["name"], r["source"], r["config"]) for r in result["rows"]] == [("stored", "stored", config)]
    assert result["rows"][0]["acc"] == evaluate(model, config, _val_batches())
    with pytest.raises(ConfigError, match=r"^bits: 8 is not one of the model's bits \[\]"):
        run_eval(compose_cli("eval", [f"checkpoint={slim}", "bits=[8]", *FAST]), str(tmp_path / "o2"))
