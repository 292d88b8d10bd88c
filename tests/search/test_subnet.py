"""Post-training search on a tiny trained model: front, evaluation, and reproduction from the int artifact."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import lightning_dbq as dbq
from lightning_dbq.cli._conf import config_dir
from lightning_dbq.cli.search import search
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.search.profile import profile_traces
from lightning_dbq.search.subnet import build_problem, evaluate, search_subnets, write_pareto
from lightning_dbq.training import DBQModule
from tests.helpers.tiny import TinyNet


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, SyntheticDataModule, Path]:
    pl.seed_everything(0)
    torch.set_num_threads(1)
    dm = SyntheticDataModule(num_samples=256, num_classes=4, image_size=8, batch_size=32, noise=1.0)
    module = DBQModule(TinyNet(width=16), num_classes=4, bits=[8, 6, 4, 2], lr=1e-2)
    pl.Trainer(accelerator="cpu", strategy="dbq", max_epochs=3, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(module, dm)  # fmt: skip
    path = dbq.save_int(module.model.eval(), tmp_path_factory.mktemp("art") / "tiny.dbq.safetensors")
    return module.model.eval(), dm, path


def test_front_is_evaluated_and_reproduced_from_the_artifact(trained, tmp_path: Path, report) -> None:
    model, dm, artifact = trained
    dm.setup()
    val = list(dm.val_dataloader())
    traces = profile_traces(model, dm.calibration_batches(64, 32), max_samples=8, progress=False)
    problem = build_problem(model, traces, val[0][0])
    subnets = search_subnets(model, problem, val, [2, 3, 4, 5, 6, 7, 8], progress=False)
    assert [s.avg_bits for s in subnets] == sorted(s.avg_bits for s in subnets)
    assert subnets[0].avg_bits <= 3.0 and subnets[-1].avg_bits >= 7.0
    for s in subnets:
        assert s.avg_bits == pytest.approx(
            sum(problem.params[i] * s.config[n] for i, n in enumerate(problem.layers)) / sum(problem.params)
        )
    write_pareto(subnets, tmp_path / "pareto.json")
    rows = json.loads((tmp_path / "pareto.json").read_text())
    served = dbq.load_int(artifact, model=TinyNet(width=16))
    for row in rows:
        dbq.set_bits(served, row["config"])
        assert evaluate(served, row["config"], val) == row["acc"]  # the stored int model reproduces pareto.json
    report("tiny SubNet front (avg bits → acc): " + ", ".join(f"{r['avg_bits']:.2f}→{r['acc']:.3f}" for r in rows))


def test_dbq_search_cli_on_an_artifact(trained, tmp_path: Path) -> None:
    _, _, artifact = trained
    # the artifact of a TinyNet cannot be rebuilt by name; check the message, then use a timm model's artifact
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("search", overrides=[f"checkpoint={artifact}", "data=synthetic", "data.image_size=8",
                                           "data.num_samples=128", "hessian.num_images=32",
                                           "hessian.max_samples=8"])  # fmt: skip
    with pytest.raises(ValueError, match="records no model name"):
        search(cfg, str(tmp_path))
    model = dbq.create_model("cifar_resnet20", bits=[8, 4, 2], num_classes=4)
    model(torch.randn(8, 3, 8, 8))
    art = dbq.save_int(model.eval(), tmp_path / "r20.dbq.safetensors")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        overrides = [
            f"checkpoint={art}", "data=synthetic", "data.image_size=8", "data.num_samples=128",
            "hessian.num_images=32", "hessian.min_samples=4", "hessian.max_samples=4", "budgets=[2,4,6,8]",
        ]  # fmt: skip
        cfg = compose("search", overrides=overrides)
    rows = search(cfg, str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert saved == rows and len(rows) >= 3
    assert all(set(r) >= {"avg_bits", "bops", "acc", "config"} for r in rows)
    for name in ("pareto.png", "bit_heatmap.png", "traces.json", "traces.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
