"""CIFAR-10 reproduction study: one resumable script, each arm's result cached in experiments/results/.

    uv run python -m experiments.cifar10.study                 # every arm not yet cached, in order
    uv run python -m experiments.cifar10.study --arms fp32,dr_8642_alrs_s0
    uv run python -m experiments.cifar10.study --smoke         # tiny sizes, separate cache: checks the plumbing

Data: ../shared/data/cifar10/train (JPEG ImageFolder). Fixed held-out validation split: 500 images per class
(5,000), chosen by ImageFolderDataModule's seeded per-class permutation (seed 0; indices recorded in
experiments/results/cifar10_split.json). Training subset: a class-balanced seeded subset of the remaining 45,000
(size in RECIPE). Model cifar_resnet20 at 32 px. The FP32 arm is trained first; every quantized arm starts from its
weights (as the paper does) and uses the same recipe (epochs, batch, optimizer, schedule). Every quantized arm is a
`dbq-train` run with the overrides listed in ARMS, so each can be re-run from the command line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_dbq.quant.kernels import KERNELS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "cifar10" / "runs"
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"

RECIPE: dict[str, Any] = {"train_subset": 10000, "val_per_class": 500, "batch_size": 128, "fp32_epochs": 15,
                          "qat_epochs": 5, "lr": 5e-4, "seed": 0}  # fmt: skip
SMOKE: dict[str, Any] = {"train_subset": 200, "val_per_class": 10, "batch_size": 50, "fp32_epochs": 1,
                         "qat_epochs": 1, "lr": 5e-4, "seed": 0}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One arm: a name and its dbq-train overrides (``fp32`` is the special FP32 arm)."""

    name: str
    overrides: tuple[str, ...] = ()
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    epoch_factor: int = 1  # QAT epochs = the recipe's x this (4: one bit-width for as many passes as DR's 4 bits)


def study_arms() -> list[Arm]:
    """Every arm of the study, in run order."""
    arms = [Arm("fp32")]
    arms += [Arm(f"lsq_w{b}", (f"quant.bits=[{b}]",)) for b in (8, 6, 4, 2)]
    for seed in (0, 1):
        arms.append(Arm(f"dr_8642_alrs_s{seed}", ("quant.bits=[8,6,4,2]", "quant.alrs=paper"), seed))
        arms.append(Arm(f"dr_8642_noalrs_s{seed}", ("quant.bits=[8,6,4,2]", "quant.alrs=off"), seed))
        arms.append(Arm(f"floor_8642_s{seed}", ("quant.bits=[8,6,4,2]", "quant.prepare.weight_mode=floor"), seed))
    arms.append(Arm("dr_432", ("quant.bits=[4,3,2]",)))
    # Compute-matched LSQ: one bit-width per run for 20 epochs = the DR arm's 5 epochs x 4 bit-widths per step.
    arms += [Arm(f"lsq_w{b}_e20", (f"quant.bits=[{b}]",), epoch_factor=4) for b in (2, 4, 8)]
    # ALRS vs no ALRS on three more seeds (paired by seed; seeds 0 and 1 are above).
    for seed in (2, 3, 4):
        arms.append(Arm(f"dr_8642_alrs_s{seed}", ("quant.bits=[8,6,4,2]", "quant.alrs=paper"), seed))
        arms.append(Arm(f"dr_8642_noalrs_s{seed}", ("quant.bits=[8,6,4,2]", "quant.alrs=off"), seed))
    # Both mixed arms start from the DR {8,6,4,2} model; the HASB arm computes the Hessian traces of that starting
    # model (8-16 Hutchinson samples on 1,000 images) and the uniform arm's SubNet search reuses them, so the two
    # fronts differ only by how the SuperNet was trained.
    mixed = ("experiment=cifar10_mixed", "callbacks.hasb.warmup_epochs=0", "+callbacks.search.budgets=[3,4]",
             "callbacks.hessian.max_samples=16")  # fmt: skip
    arms.append(Arm("mixed_hasb", mixed, extra={"init_from": "dr_8642_alrs_s0"}))
    arms.append(Arm("mixed_uniform", (*mixed, "callbacks.hasb.uniform=true"),
                    extra={"init_from": "dr_8642_alrs_s0", "traces_from": "mixed_hasb"}))  # fmt: skip
    return arms


def _result_path(arm: str, smoke: bool) -> Path:
    return RESULTS / ("smoke" if smoke else "") / f"cifar10_{arm}.json"


def _data(recipe: dict[str, Any], seed: int) -> Any:
    from lightning_dbq.data import ImageFolderDataModule

    return ImageFolderDataModule(str(DATA), batch_size=recipe["batch_size"], val_per_class=recipe["val_per_class"],
                                 train_subset=recipe["train_subset"], cache_in_memory=True, seed=0,
                                 augment=True)  # fmt: skip


def _run_fp32(recipe: dict[str, Any], out: Path, results_dir: Path) -> dict[str, Any]:
    import lightning.pytorch as pl

    from experiments.cifar10.fp32 import FPClassifier

    pl.seed_everything(recipe["seed"])
    dm = _data(recipe, recipe["seed"])
    module = FPClassifier("cifar_resnet20", dm.num_classes, lr=recipe["lr"] * 4)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_epochs=recipe["fp32_epochs"], logger=False,
                         enable_checkpointing=False, default_root_dir=out, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, dm)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict()}, out / "fp32.ckpt")
    split = dm.split_indices()
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "cifar10_split.json").write_text(json.dumps({"val": split.val, "train": split.train}))
    return {"val": {"fp32": {"acc": float(trainer.callback_metrics["val/acc_fp32"])}},
            "checkpoint": str((out / "fp32.ckpt").relative_to(ROOT))}  # fmt: skip


def arm_overrides(arm: Arm, recipe: dict[str, Any], out: Path, init: Path, kernel: str | None) -> list[str]:
    """The ``dbq-train`` overrides of a quantized arm (``out``: its run folder, ``init``: the starting checkpoint)."""
    overrides = [
        "data=imagefolder", f"data.root={DATA}", f"data.train_subset={recipe['train_subset']}",
        f"data.val_per_class={recipe['val_per_class']}", f"data.batch_size={recipe['batch_size']}", "data.seed=0",
        "model=cifar_resnet20", f"model.init_checkpoint={init}",
        f"trainer.max_epochs={recipe['qat_epochs'] * arm.epoch_factor}", f"optim.lr={recipe['lr']}", f"seed={arm.seed}",
        "logger=csv", "test=false", "trainer.accelerator=auto",
        *arm.overrides,
    ]  # fmt: skip
    if "traces_from" in arm.extra:
        overrides.append(f"callbacks.hessian.traces_path={out.parent / arm.extra['traces_from'] / 'traces.json'}")
    if kernel is not None:
        overrides.append(f"quant.prepare.kernel={kernel}")
    if recipe is SMOKE and any(o.startswith("experiment=cifar10_mixed") for o in arm.overrides):
        overrides += ["callbacks.hessian.num_images=64", "callbacks.hessian.batch_size=32",
                      "callbacks.hessian.min_samples=4", "callbacks.hessian.max_samples=4"]  # fmt: skip
    return overrides


def _run_dbq(arm: Arm, recipe: dict[str, Any], out: Path, init: Path, kernel: str | None) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from lightning_dbq.cli._conf import config_dir
    from lightning_dbq.cli.train import train

    overrides = arm_overrides(arm, recipe, out, init, kernel)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    train(cfg)
    results = json.loads((out / "results.json").read_text())
    if (out / "pareto.json").is_file():
        results["pareto"] = json.loads((out / "pareto.json").read_text())
    results["overrides"] = overrides
    results["kernel"] = str(cfg.quant.prepare.get("kernel", "fused"))  # fake-quant back-end (lightning_dbq.set_kernel)
    return results


def main(argv: list[str] | None = None) -> None:
    """Run the arms that have no cached result (or the ones named)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="", help="comma-separated arm names (default: every arm)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, results under experiments/results/smoke")
    parser.add_argument("--force", action="store_true", help="re-run arms even if cached")
    parser.add_argument("--kernel", choices=KERNELS, default=None,
                        help="fake-quant back-end (quant.prepare.kernel; recorded in the result). Forward values are "
                             "identical for every back-end; 'compile' is the fastest, but Hessian traces (mixed arms) "
                             "need 'fused' or 'eager'")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: two arms can run side by side)")
    args = parser.parse_args(argv)
    recipe = SMOKE if args.smoke else RECIPE
    torch.set_num_threads(args.threads if not torch.cuda.is_available() else torch.get_num_threads())
    arms = {a.name: a for a in study_arms()}
    names = [n for n in args.arms.split(",") if n] or list(arms)
    unknown = sorted(set(names) - set(arms))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {list(arms)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({args.threads} thread(s))"
    for name in names:
        path = _result_path(name, args.smoke)
        if path.is_file() and not args.force:
            print(f"[study] {name}: cached at {path.relative_to(ROOT)}")
            continue
        arm = arms[name]
        out = RUNS / ("smoke" if args.smoke else "") / name
        start = time.time()
        if name == "fp32":
            result = _run_fp32(recipe, out, path.parent)
        else:
            fp_out = RUNS / ("smoke" if args.smoke else "") / arm.extra.get("init_from", "fp32")
            init = next(iter(sorted(fp_out.glob("*.ckpt")) + sorted(fp_out.glob("checkpoints/last.ckpt"))), None)
            traces_from = arm.extra.get("traces_from")
            if traces_from and not (out.parent / traces_from / "traces.json").is_file():
                init, parent = None, traces_from  # the traces come from another arm's run folder
            else:
                parent = arm.extra.get("init_from", "fp32")
            if init is None:  # run folders are not committed: re-create the (deterministic) parent arm first
                print(f"[study] {name}: needs the {parent} run folder (checkpoint / traces); running {parent} first")
                main([f"--arms={parent}", "--force", *(["--smoke"] if args.smoke else [])])
                return main(argv)
            result = _run_dbq(arm, recipe, out, init, args.kernel)
        result.update({"arm": name, "seed": arm.seed, "recipe": recipe, "device": device,
                       "elapsed_s": round(time.time() - start, 1)})  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"[study] {name}: {result['val']} in {result['elapsed_s']} s -> {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
