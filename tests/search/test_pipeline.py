"""The shared search pipeline: served grid weights, ckpt-vs-artifact agreement, configs, registries."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import lightning_dbq as dbq
from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.search.configs import (
    average_bits,
    check_config,
    pareto_configs,
    pareto_row,
    read_pareto,
    uniform_configs,
)
from lightning_dbq.search.pipeline import (
    default_budgets,
    layer_names,
    print_subnets,
    search_front,
    served_traces,
    served_weights,
    write_search_outputs,
)
from lightning_dbq.search.profile import profile_traces
from lightning_dbq.search.subnet import build_problem

HESSIAN = {"min_samples": 2, "max_samples": 4, "rel_tol": 0.1, "progress": False}


@pytest.fixture(scope="module")
def data() -> SyntheticDataModule:
    dm = SyntheticDataModule(num_samples=96, num_classes=4, image_size=8, batch_size=32, seed=0)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def model_and_artifact(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A cifar_resnet20 with latent weights off the 8-bit grid (random init + a few SGD steps) and its artifact."""
    torch.manual_seed(0)
    model = dbq.create_model("cifar_resnet20", bits=[8, 4, 2], num_classes=4)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    path = dbq.save_int(model, tmp_path_factory.mktemp("art") / "r20.dbq.safetensors")
    return model, path


def test_served_weights_are_the_artifacts_and_are_restored(model_and_artifact) -> None:
    model, path = model_and_artifact
    served = dbq.load_int(path)
    names = layer_names(model)
    latent = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    dbq.set_bits(model, 2)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = {b: model(x) for b in (2, 4, 8) if dbq.set_bits(model, b) is not None}
    dbq.set_bits(model, 2)
    with served_weights(model):
        assert set(dbq.bit_config(model).values()) == {8}  # highest bit inside
        for n in names:  # bit for bit what load_int decodes
            assert torch.equal(model.get_submodule(n).weight, served.get_submodule(n).weight), n
        assert any(not torch.equal(latent[n], model.get_submodule(n).weight) for n in names)
        with torch.no_grad():
            for b, out in before.items():  # fake-quant forwards are unchanged: codes derive from q_h
                dbq.set_bits(model, b)
                assert torch.equal(model(x), out), b
        dbq.set_bits(model, 8)
    assert set(dbq.bit_config(model).values()) == {2}  # bit state restored
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, latent[n]), n  # latent weights restored
    with pytest.raises(RuntimeError, match="boom"), served_weights(model):
        raise RuntimeError("boom")
    assert all(torch.equal(model.get_submodule(n).weight, latent[n]) for n in names)


def test_checkpoint_and_artifact_give_the_same_traces_costs_and_front(model_and_artifact, data, report) -> None:
    """The dbq-search discrepancy: a .ckpt holds the latent weights W, the artifact q_h·s_h. Profiled as they are,
    the two give different traces; on the served grid weights, identical traces, costs and SubNets."""
    model, path = model_and_artifact
    served = dbq.load_int(path)
    batches = data.calibration_batches(24, 24)
    val = list(data.val_dataloader())
    latent_t = profile_traces(model, batches, **HESSIAN)
    artifact_t = profile_traces(served, batches, **HESSIAN)
    rel = max(abs(latent_t[n].trace - artifact_t[n].trace) / abs(artifact_t[n].trace) for n in artifact_t)
    assert rel > 0  # the old behaviour: different weights, different traces
    a, b = served_traces(model, batches, **HESSIAN), served_traces(served, batches, **HESSIAN)
    assert a == b
    with served_weights(model), served_weights(served):
        pa, pb = build_problem(model, a, val[0][0]), build_problem(served, b, val[0][0])
    assert (pa.cost == pb.cost).all()
    ra = search_front(model, a, val, budgets=[2, 3, 4, 6, 8], progress=False)
    rb = search_front(served, b, val, budgets=[2, 3, 4, 6, 8], progress=False)
    assert ra.rows() == rb.rows() and ra.uniform == rb.uniform
    report(f"ckpt vs artifact traces (tiny r20): latent-weight profiling differs by up to {100 * rel:.2f} %, "
           "served-grid profiling is identical")  # fmt: skip


def test_outputs_table_and_budgets(model_and_artifact, data, tmp_path: Path) -> None:
    from rich.console import Console

    from lightning_dbq.training.callbacks.search import default_budgets as legacy

    assert legacy is default_budgets and default_budgets((8, 4, 2)) == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0,
                                                                       6.5, 7.0, 7.5, 8.0]  # fmt: skip
    model, _ = model_and_artifact
    val = list(data.val_dataloader())
    traces = served_traces(model, data.calibration_batches(24, 24), **HESSIAN)
    result = search_front(model, traces, val, budgets=[2, 5, 8], progress=False)
    paths = write_search_outputs(result, tmp_path, traces=True)
    assert json.loads(paths["pareto"].read_text()) == result.rows()
    assert {p.name for p in paths.values()} == {"pareto.json", "pareto.png", "bit_heatmap.png", "traces.json",
                                                "traces.png"}  # fmt: skip
    buf = io.StringIO()
    print_subnets(result.subnets, result.n_layers, console=Console(file=buf, width=100))
    text = buf.getvalue()
    assert f"searched SubNets ({result.n_layers} layers)" in text
    assert f"{100 * result.subnets[0].acc:.2f} %" in text


def test_configs_check_layers_bits_and_rows(model_and_artifact, tmp_path: Path) -> None:
    model, _ = model_and_artifact
    names = layer_names(model)
    good = dict.fromkeys(names, 4) | {names[0]: 2}
    assert check_config(model, good) == good
    with pytest.raises(ValueError, match=rf"layer '{names[1]}' of the model is missing from x"):
        check_config(model, {n: 4 for n in names if n != names[1]}, where="x")
    with pytest.raises(ValueError, match="names 'head.fc', which is not a quantized layer"):
        check_config(model, {**good, "head.fc": 4})
    with pytest.raises(ValueError, match=rf"layer '{names[0]}' has bits 6 .*allowed: \[8, 4, 2\]"):
        check_config(model, {**good, names[0]: 6})
    assert [c.name for c in uniform_configs(model)] == ["w8a8", "w4a4", "w2a2"]
    with pytest.raises(ValueError, match=r"6 is not one of the model's bits \[8, 4, 2\]"):
        uniform_configs(model, [8, 6])
    pareto = tmp_path / "pareto.json"
    pareto.write_text(json.dumps([{"avg_bits": 4.0, "config": good}, {"config": dict.fromkeys(names, 8)}]))
    rows = pareto_configs(model, pareto)
    assert [r.name for r in rows] == ["pareto[0]", "pareto[1]"] and rows[1].avg_bits == 8.0
    assert rows[0].avg_bits == pytest.approx(average_bits(model, good)) and 2 < rows[0].avg_bits < 4
    assert pareto_row(pareto, 1)["config"] == dict.fromkeys(names, 8)
    with pytest.raises(ValueError, match="row 2 is out of range: .* has 2 rows"):
        pareto_row(pareto, 2)
    bad = tmp_path / "bad.json"
    for content, match in (("{", "not a readable pareto.json"), ("[]", "non-empty JSON list"),
                           ('[{"acc": 1}]', "row 0 has no 'config' object")):  # fmt: skip
        bad.write_text(content)
        with pytest.raises(ValueError, match=match):
            read_pareto(bad)


def test_registries_match_the_library() -> None:
    from lightning_dbq.export.onnx import EXPORT_MODES
    from lightning_dbq.search import options
    from lightning_dbq.search.subnet import COSTS

    assert options.ONNX_MODES == EXPORT_MODES
    assert options.SEARCH_COSTS == COSTS
    assert set(options.EXPORT_SUFFIXES) == set(options.EXPORT_FORMATS)
    for registry in (options.EXPORT_FORMATS, options.RUNTIMES):
        for name in registry:
            assert callable(options.resolve(registry, name, "field"))
    with pytest.raises(ValueError, match=r"format: got 'tflite'; allowed: \['onnx', 'torchscript', 'dbq'\]"):
        options.resolve(options.EXPORT_FORMATS, "tflite", "format")
    with pytest.raises(ValueError, match="module:function"):
        options.register_runtime("tvm", "no_colon")


def test_dbq_search_on_a_checkpoint_and_its_artifact_writes_the_same_front(tmp_path: Path) -> None:
    from lightning_dbq.cli.search import load_model, search
    from tests.cli.test_export_cli import DATA, compose_cli, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints")
    artifact = dbq.save_int(load_model(str(ckpt)), tmp_path / "run" / "model.dbq.safetensors")  # as DBQReport does
    hessian = ["hessian.num_images=24", "hessian.batch_size=24", "hessian.min_samples=2", "hessian.max_samples=4"]
    out = {}
    for name, path in (("ckpt", ckpt), ("artifact", artifact)):
        cfg = compose_cli("search", [f"checkpoint={path}", *DATA, *hessian, "budgets=[2,3,4,6,8]"])
        out[name] = search(cfg, str(tmp_path / name))
    assert out["ckpt"] == out["artifact"]
    for f in ("pareto.json", "traces.json"):
        assert (tmp_path / "ckpt" / f).read_text() == (tmp_path / "artifact" / f).read_text(), f


def test_subnet_search_callback_runs_the_pipeline(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_dbq.training import DBQModule
    from lightning_dbq.training.callbacks import SubNetSearch
    from tests.helpers.tiny import TinyNet

    pl.seed_everything(0)
    dm = SyntheticDataModule(num_samples=64, num_classes=4, image_size=8, batch_size=32)
    module = DBQModule(TinyNet(width=8), num_classes=4, bits=[8, 4, 2], lr=1e-2)
    cb = SubNetSearch(str(tmp_path), budgets=[2, 4, 8])
    pl.Trainer(accelerator="cpu", strategy="dbq", max_epochs=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, callbacks=[cb]).fit(module, dm)  # fmt: skip
    assert cb.result is not None and len(cb.result) == 3
    assert json.loads((tmp_path / "pareto.json").read_text()) == cb.result
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "bit_heatmap.png").stat().st_size > 0
    assert set(dbq.bit_config(module.model).values()) == {8}  # back at the highest bit
    layers = [module.model.get_submodule(n) for n in layer_names(module.model)]
    on_grid = [torch.equal(m.weight, m.weight_quant.codes(m.weight).float() * m.weight_quant.effective_scale())
               for m in layers]  # fmt: skip
    assert not all(on_grid)  # the latent weights are back (the search ran on the grid weights)
