"""dbq-train: composing every config option, the results.json interface, config validation, multirun + W&B."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.train import _log_latent_lr, resolve_weight_mode, train, wandb_run_names
from lightning_dbq.cli.validate import ConfigError, validate_train_config
from tests.helpers.hydra import compose_train

CONF = Path(config_dir())
TINY = [
    "data=synthetic", "data.num_samples=96", "data.image_size=8", "trainer.max_epochs=1", "logger=none",
    "callbacks.progress_bar=null", "test=false",
]  # fmt: skip


WANDB_ENV = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


def _wandb_name_and_group(job_dir: Path) -> tuple[str, str]:
    """Display name and group of the one offline W&B run under ``job_dir``, read from its ``run-*.wandb`` record log
    (LevelDB-style log: 7-byte file header, 32 KiB blocks, records ``crc32 | length u16 | type u8 | payload``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (job_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, payload = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "run":
                return record.run.display_name, record.run.run_group
    raise AssertionError(f"no run record in {path}")


_compose = compose_train


def _group_options() -> list[tuple[str, str]]:
    out = []
    for group in ("data", "model", "quant", "optim", "trainer", "callbacks", "logger", "experiment"):
        for f in sorted((CONF / group).glob("*.yaml")):
            out.append((group, f.stem))
    return out


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes(group: str, option: str) -> None:
    extra = ["data.root=/tmp"] if (group, option) == ("data", "imagefolder") else []
    cfg = _compose([f"{group}={option}", *extra])
    assert cfg.quant.bits and cfg.model.name


def test_train_writes_results_json_artifact_and_plot(tmp_path: Path) -> None:
    cfg = _compose([*TINY, "model.name=cifar_resnet20", "quant.bits=[8,4,2]"], output_dir=tmp_path)
    metrics = train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bits"] == [8, 4, 2]
    assert set(results["val"]) == {"w8a8", "w4a4", "w2a2"}
    assert all(0.0 <= v["acc"] <= 1.0 for v in results["val"].values())
    assert (tmp_path / results["artifact"]).is_file()
    assert (tmp_path / results["checkpoint"]).is_file()
    assert (tmp_path / "per_bit_accuracy.png").stat().st_size > 1000
    assert metrics["val/acc_w8a8"] == pytest.approx(results["val"]["w8a8"]["acc"])
    ckpt = torch.load(tmp_path / results["checkpoint"], map_location="cpu", weights_only=True)  # no OmegaConf inside
    assert ckpt["hyper_parameters"]["bits"] == [8, 4, 2]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.name=resnet_nonexistent"], "model.name: unknown model 'resnet_nonexistent'"),
        (["model.name=mobilenetv3_smal_100"], r"model.name: unknown model .*did you mean 'mobilenetv3_small_100'\?"),
        (["quant.bits=[8,9]"], r"quant.bits: .*got 9"),
        (["quant.bits=[8,8]"], "quant.bits: .*duplicates"),
        (["quant.bits=[]"], "quant.bits: .*must not be empty"),
        (["data=imagefolder", "data.root=/nonexistent/cifar"], "data.root: '/nonexistent/cifar' does not exist"),
        (
            ["data=imagefolder", "data.root=/tmp", "data.test_root=/nonexistent/t"],
            "data.test_root: '/nonexistent/t' does",
        ),
        (["+model.kwargs.num_classes=7"], "model.kwargs.num_classes: set to 7"),
        (["+model.num_classes=7"], "model.num_classes: 7 does not match the data's 4 classes"),
        (["quant.algorithm=A3"], r"quant.algorithm: got 'A3'; allowed: \['A2', 'A1'\]"),
        (["optim.optimizer=lion"], "optim.optimizer: got 'lion'"),
        (
            ["quant.prepare.kernel=cuda"],
            r"quant.prepare.kernel: got 'cuda'; allowed: \['fused', 'eager', 'compile', 'auto'\]",
        ),
        (["quant.prepare.weight_mode=ceil"], "quant.prepare.weight_mode: got 'ceil'"),
        (["quant.weight_mode=ceil"], "quant.weight_mode: got 'ceil'"),
        (["quant.weight_mode=binary", "quant.prepare.weight_mode=floor"], "quant.weight_mode: got 'binary' but"),
    ],
)
def test_invalid_configs_fail_before_training(tmp_path: Path, overrides: list[str], match: str) -> None:
    base = [o for o in TINY if not o.startswith("data")] if any(o.startswith("data=") for o in overrides) else TINY
    cfg = _compose([*base, *overrides], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [([], "double_round"), (["quant.weight_mode=binary"], "binary"),
     (["quant.weight_mode=floor", "quant.prepare.weight_mode=floor"], "floor"),
     (["quant.prepare.weight_mode=unshared"], "unshared")],
)  # fmt: skip
def test_weight_mode_shorthand_sets_the_prepare_key(overrides: list[str], expected: str) -> None:
    cfg = _compose(overrides)
    resolve_weight_mode(cfg)
    assert cfg.quant.prepare.weight_mode == expected


@pytest.mark.parametrize(("mode", "latent", "level", "text"),
                         [("binary", None, "INFO", "latent weights train at lr 0.01"),
                          ("binary", 1e-3, "WARNING", "consider optim.latent_lr=null"),
                          ("binary", 2e-2, "WARNING", None), ("double_round", None, "INFO", None)])  # fmt: skip
def test_latent_lr_message_comes_from_the_weight_mode(mode: str, latent: float | None, level: str, text: str | None,
                                                      caplog) -> None:  # fmt: skip
    cfg = _compose(
        [f"quant.weight_mode={mode}", "optim.lr=5e-4", f"optim.latent_lr={'null' if latent is None else latent}"]
    )
    resolve_weight_mode(cfg)
    with caplog.at_level(level, logger="lightning_dbq.cli.train"):
        _log_latent_lr(cfg)
    if text is None:
        assert "latent" not in caplog.text
    else:
        assert text in caplog.text and all(r.levelname == level for r in caplog.records)


def test_validation_accepts_the_default_config() -> None:
    validate_train_config(_compose([]))


def test_train_log_holds_the_run_and_wandb_names_can_be_set(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "lightning_dbq.cli.train", *TINY[:-2], "quant.bits=[4,2]", "logger=wandb",
        "logger.wandb.name=my-run", "logger.wandb.group=my-group", "callbacks.progress_bar=null", "test=false",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=WANDB_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    assert "[lightning_dbq.cli.train][INFO] - dbq-train: model cifar_resnet20, bits [4, 2]" in log
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - `Trainer.fit` stopped: `max_epochs=1` reached." in log
    assert "[lightning_dbq.cli.train][INFO] - final val accuracy per bit-width: w4a4 " in log
    assert log.count("Trainer.fit` stopped") == 1  # one handler chain: no duplicated lines
    assert _wandb_name_and_group(tmp_path) == ("my-run", "my-group")  # user values beat the derived ones


def test_wandb_names_derive_from_the_bit_list() -> None:
    assert wandb_run_names(_compose(["quant.bits=[2,8,4]"])) == ("bits-8-4-2", "bits-8-4-2")  # outside a Hydra job


def test_multirun_over_bit_lists_gives_separate_jobs_and_wandb_runs(tmp_path: Path, report) -> None:
    env = WANDB_ENV
    cmd = [
        sys.executable, "-m", "lightning_dbq.cli.train", "-m", "quant.bits=[8,4,2],[4,3,2]", *TINY[:-2],
        "logger=wandb", "callbacks.progress_bar=null", "test=false", f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "results.json").exists())
    assert [p.name for p in jobs] == ["0", "1"]
    bits = [json.loads((p / "results.json").read_text())["bits"] for p in jobs]
    assert bits == [[8, 4, 2], [4, 3, 2]]
    run_dirs = [sorted((p / "wandb").glob("offline-run-*")) for p in jobs]
    assert all(len(r) == 1 for r in run_dirs), run_dirs
    ids = {r[0].name.rsplit("-", 1)[-1] for r in run_dirs}
    assert len(ids) == 2  # two separate W&B runs, one per job
    names = [_wandb_name_and_group(p) for p in jobs]
    rest = "data.image_size=8,data.num_samples=96,data=synthetic,test=False,trainer.max_epochs=1"  # as swept
    assert names == [(f"bits-8-4-2_{rest}", "bits-8-4-2"), (f"bits-4-3-2_{rest}", "bits-4-3-2")]
    for job, bit_list in zip(jobs, ("[8, 4, 2]", "[4, 3, 2]"), strict=True):  # each job logs to its own train.log
        assert f"dbq-train: model cifar_resnet20, bits {bit_list}" in (job / "train.log").read_text()
    report(f"multirun quant.bits=[8,4,2],[4,3,2]: jobs {[p.name for p in jobs]}, W&B offline runs {sorted(ids)}")
