"""ONNX parity on real data: a short-trained cifar_resnet20 {8,6,4,2}, PyTorch vs ONNX Runtime, exact and integer.

    uv run python -m experiments.serve.onnx_parity            # trains once (cached run folder), then measures
    uv run python -m experiments.serve.onnx_parity --smoke    # tiny sizes: checks the plumbing

Data: the CIFAR-10 training images (JPEG ImageFolder at ../shared/data/cifar10/train). A seeded, class-balanced
split: ``val_per_class`` images per class are held out (never trained on) and every parity figure is measured on
them; the model is trained for a few epochs on a class-balanced subset of the rest (a *short* training: the point is
parity, not accuracy). The Pareto configuration is a row of the run's own SubNet search (``pareto.json``).

Per configuration (w8a8, w6a6, w4a4, w2a2, one Pareto row): top-1 agreement of ORT ``exact`` with the PyTorch model
at that configuration (``set_bits``, eval mode), max |Δlogit|, the fraction of activation codes where ONNX's round
half to even differs from our round half up (measured on the frozen model), and for ``integer`` the accuracy
difference to PyTorch. Writes ``experiments/results/onnx_parity.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "serve" / "runs"

RECIPE: dict[str, Any] = {"train_subset": 3000, "val_per_class": 200, "batch_size": 100, "epochs": 3, "lr": 2e-3,
                          "calib_images": 256}  # fmt: skip
SMOKE: dict[str, Any] = {"train_subset": 200, "val_per_class": 10, "batch_size": 50, "epochs": 1, "lr": 2e-3,
                         "calib_images": 64}  # fmt: skip


def _overrides(recipe: dict[str, Any], smoke: bool) -> list[str]:
    o = [
        "data=imagefolder", f"data.root={DATA}", f"data.train_subset={recipe['train_subset']}",
        f"data.val_per_class={recipe['val_per_class']}", f"data.batch_size={recipe['batch_size']}", "data.seed=0",
        "model=cifar_resnet20", f"trainer.max_epochs={recipe['epochs']}", f"optim.lr={recipe['lr']}", "seed=0",
        "logger=csv", "test=false", "quant.bits=[8,6,4,2]",
    ]  # fmt: skip
    h = 64 if smoke else 256
    o += [  # the multi-precision run's own SubNet search gives the Pareto configuration
        "+callbacks.hessian._target_=lightning_dbq.training.callbacks.hessian.HessianTraces",
        "+callbacks.hessian.output_dir=${paths.output_dir}", f"+callbacks.hessian.num_images={h}",
        "+callbacks.hessian.batch_size=125", f"+callbacks.hessian.max_samples={4 if smoke else 16}",
        f"+callbacks.hessian.min_samples={4 if smoke else 8}", "+callbacks.hessian.compute_at=demand",
        "+callbacks.search._target_=lightning_dbq.training.callbacks.search.SubNetSearch",
        "+callbacks.search.output_dir=${paths.output_dir}",
    ]  # fmt: skip
    return o


def train(recipe: dict[str, Any], out: Path, smoke: bool) -> Path:
    """Run ``dbq-train`` once into ``out`` (skipped when its last checkpoint exists); returns the checkpoint."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from lightning_dbq.cli._conf import config_dir
    from lightning_dbq.cli.train import train as run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=_overrides(recipe, smoke), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    run(cfg)
    return ckpt


def _datamodule(recipe: dict[str, Any]) -> Any:
    from lightning_dbq.data import ImageFolderDataModule

    dm = ImageFolderDataModule(
        str(DATA), batch_size=recipe["batch_size"], val_per_class=recipe["val_per_class"],
        train_subset=recipe["train_subset"], cache_in_memory=True, seed=0, augment=False,
    )  # fmt: skip
    dm.setup()
    return dm


def _tie_flips(frozen: torch.nn.Module, xs: list[torch.Tensor]) -> tuple[int, int]:
    """Activation codes where ONNX's rule (half to even) differs from ours (half up), and the total count."""
    from lightning_dbq.export.onnx import OnnxActQuant
    from lightning_dbq.quant.convert import FrozenActQuant

    counts = [0, 0]

    def hook(mod: Any, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        counts[0] += int((OnnxActQuant(mod)(inp[0]) != out).sum())
        counts[1] += out.numel()

    hs = [m.register_forward_hook(hook) for m in frozen.modules() if isinstance(m, FrozenActQuant)]
    try:
        with torch.no_grad():
            for x in xs:
                frozen(x)
    finally:
        for h in hs:
            h.remove()
    return counts[0], counts[1]


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure(recipe: dict[str, Any], ckpt: Path, run_dir: Path) -> dict[str, Any]:
    """Every parity figure of the module docstring, on the held-out split."""
    import lightning_dbq as dbq
    from lightning_dbq.cli.search import load_model

    model = load_model(str(ckpt)).eval()
    dm = _datamodule(recipe)
    val = [(x, y) for x, y in dm.val_dataloader()]
    xs = [x for x, _ in val]
    ys = torch.cat([y for _, y in val])
    calib, n = [], 0
    for x, _ in dm.train_dataloader():
        calib.append(x)
        n += len(x)
        if n >= recipe["calib_images"]:
            break
    configs: dict[str, Any] = {f"w{b}a{b}": b for b in (8, 6, 4, 2)}
    pareto_file = run_dir / "pareto.json"
    if pareto_file.is_file():
        rows = json.loads(pareto_file.read_text())
        mid = [r for r in rows if 2 < float(r["avg_bits"]) < 8] or rows
        row = min(mid, key=lambda r: abs(float(r["avg_bits"]) - 5.0))
        configs[f"pareto@{float(row['avg_bits']):.2f}b"] = dict(row["config"])
    out: dict[str, Any] = {"n_images": int(len(ys)), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs.items():
            dbq.set_bits(model, cfg)
            with torch.no_grad():
                ref = torch.cat([model(x) for x in xs])
            frozen = dbq.freeze(model, cfg)
            flips, codes = _tie_flips(frozen, xs)
            acc = float((ref.argmax(1) == ys).float().mean())
            row: dict[str, Any] = {"avg_bits": _avg_bits(model, cfg), "torch_acc": acc, "tie_flip_codes": flips,
                                   "codes": codes}  # fmt: skip
            for mode in ("exact", "integer"):
                kw = {"calibration_data": calib} if mode == "integer" else {}
                path = dbq.export_onnx(model, cfg, Path(tmp) / f"{name}_{mode}.onnx", xs[0][:1], mode=mode, **kw)
                sess = _session(path)
                got = torch.cat([torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]) for x in xs])
                row[mode] = {
                    "agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
                    "max_abs_dlogit": float((got - ref).abs().max()),
                    "acc": float((got.argmax(1) == ys).float().mean()),
                }
            row["integer"]["acc_minus_torch"] = row["integer"]["acc"] - row["torch_acc"]
            out["configs"][name] = row
            e, i = row["exact"], row["integer"]
            print(
                f"{name:>16}: torch acc {row['torch_acc']:.4f} | exact agree {e['agreement']:.4f} "
                f"max|dl| {e['max_abs_dlogit']:.3g} | integer acc {i['acc']:.4f} "
                f"({100 * i['acc_minus_torch']:+.2f} pt) agree {i['agreement']:.4f} | tie flips {flips}/{codes}"
            )
    return out


def _avg_bits(model: torch.nn.Module, cfg: Any) -> float:
    from lightning_dbq.quant.prepare import quantized_layers

    layers = quantized_layers(model)
    if isinstance(cfg, int):
        return float(cfg)
    total = sum(i.params for i in layers)
    return float(sum(cfg[i.name] * i.params for i in layers) / total)


def main(argv: list[str] | None = None) -> None:
    """Train (cached) and measure; write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, separate run folder and result file")
    args = p.parse_args(argv)
    recipe = SMOKE if args.smoke else RECIPE
    torch.set_num_threads(2)
    run_dir = RUNS / ("smoke" if args.smoke else "cifar_resnet20_8642")
    t0 = time.time()
    ckpt = train(recipe, run_dir, args.smoke)
    t_train = time.time() - t0
    result = measure(recipe, ckpt, run_dir)
    cmd = "python -m experiments.serve.onnx_parity" + (" --smoke" if args.smoke else "")
    cpu = platform.processor() or platform.machine()
    result.update({"recipe": recipe, "train_seconds": round(t_train, 1), "cpu": cpu, "command": cmd})
    dest = RESULTS / ("smoke" if args.smoke else "") / "onnx_parity.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
