"""FQT study (issue 12, Deliver 5): 1-bit fully quantized fine-tuning on a CIFAR-10 transfer split.

    uv run python -m experiments.fqt.study                  # every arm not yet cached, in order
    uv run python -m experiments.fqt.study --arms r20_agp_adam,r20_psq1_adam
    uv run python -m experiments.fqt.study --smoke          # tiny sizes, separate cache: checks the plumbing
    uv run python -m experiments.fqt.claims                 # table, plot and claims from the cached results

Setting (the paper's is fine-tuning from a 1-bit ImageNet checkpoint; ours is built from the data we have):
source task = CIFAR-10 classes 0-4, target task = classes 5-9 (experiments/fqt/data.py). Per model:
``pretrain_fp32`` (FP32, source task) → ``pretrain_w1a1`` (W1A1 QAT: binary weights and activations, exact
gradients, source task) → every fine-tuning arm starts from that checkpoint with a new 5-way head and trains on the
target task. First and last layer FP (prepare's default); cifar_resnet20's 1x1 downsample convs FP too, as in the
paper's recipe. Arms differ only in the gradient estimator and the optimizer.

Measured per arm: target-task validation accuracy (1,000 held-out images); on the *starting* model and one fixed
batch of 128 target images, the per-layer relative gradient variance E‖ĝ−g‖²/‖g‖² of each quantized layer's weight
gradient vs the exact (QAT) gradient over ``draws`` backward passes, the fraction of gradient groups kept and the
average gradient bits (lightning_dbq.fqt.record_grad_stats); peak extra memory of one training step
(experiments/bench/memory_probe.py, a fresh process per arm). Results: experiments/results/fqt/<arm>.json (resumable).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results" / "fqt"
RUNS = ROOT / "experiments" / "fqt" / "runs"
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train"

RECIPE: dict[str, Any] = {"pre_per_class": 1000, "ft_per_class": 500, "val_per_class": 200, "batch_size": 128,
                          "fp32_epochs": 5, "fp32_lr": 2e-3, "w1a1_epochs": 5, "w1a1_lr": 5e-3, "ft_epochs": 5,
                          "draws": 8, "weight_decay": 5e-5}  # fmt: skip
SMOKE: dict[str, Any] = {"pre_per_class": 20, "ft_per_class": 20, "val_per_class": 10, "batch_size": 50,
                         "fp32_epochs": 1, "fp32_lr": 2e-3, "w1a1_epochs": 1, "w1a1_lr": 5e-3, "ft_epochs": 1,
                         "draws": 2, "weight_decay": 5e-5}  # fmt: skip
#: optimizer name → (DBQModule optimizer, lr, momentum): plain SGD gets 10x the momentum arm's lr, the same
#: effective step size lr / (1 - momentum)
OPTIMIZERS: dict[str, tuple[str, float, float]] = {"adam": ("adam", 1e-3, 0.9), "sgdm": ("sgd", 1e-2, 0.9),
                                                   "sgd": ("sgd", 1e-1, 0.0)}  # fmt: skip
#: estimator name → quant.grad settings (None: exact gradients, 1-bit QAT)
METHODS: dict[str, dict[str, Any] | None] = {
    "qat": None,
    "psq1": {"method": "psq", "bits": 1},
    "agp": {"method": "agp", "bits": 4, "keep": 0.25},  # the paper's average-1-bit method, with SCQ
    "topk": {"method": "topk", "bits": 4, "keep": 0.25},  # the public code's biased pruning
    "bhq1": {"method": "bhq", "bits": 1},
    "psq8": {"method": "psq", "bits": 8},  # the INT8 FQT reference
}
MODELS = {"r20": "cifar_resnet20", "mbv2": "mobilenetv2_100"}
SKIP = {"r20": ["*.downsample.*"], "mbv2": []}


@dataclass(frozen=True)
class Arm:
    """One fine-tuning arm: model key, estimator key, optimizer key, seed."""

    model: str
    method: str
    optimizer: str = "adam"
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.model}_{self.method}_{self.optimizer}" + (f"_s{self.seed}" if self.seed else "")


def study_arms() -> list[Arm]:
    """Every fine-tuning arm, in run order (the main arms first)."""
    arms = [Arm("r20", m) for m in ("qat", "agp", "psq1", "topk", "bhq1", "psq8")]
    arms += [Arm("r20", m, o) for o in ("sgdm", "sgd") for m in ("qat", "agp", "psq1")]
    arms += [Arm("mbv2", m) for m in ("qat", "agp", "psq1")]
    return arms


def _split(recipe: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from experiments.fqt.data import SOURCE, TARGET, load_split

    return {
        "source": load_split(DATA, RUNS, SOURCE, recipe["pre_per_class"]),
        "target": load_split(DATA, RUNS, TARGET, recipe["ft_per_class"]),
        "val": load_split(DATA, RUNS, TARGET, recipe["val_per_class"], offset=recipe["ft_per_class"]),
    }


def _trainer(epochs: int, out: Path) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                      default_root_dir=out, enable_model_summary=False, enable_progress_bar=True,
                      num_sanity_val_steps=0)  # fmt: skip


def _module(model: str, grad: dict[str, Any] | None, optimizer: str, recipe: dict[str, Any], seed: int,
            lr: float | None = None, init: Path | None = None) -> Any:  # fmt: skip
    from lightning_dbq.training.module import DBQModule

    opt, default_lr, momentum = OPTIMIZERS[optimizer]
    return DBQModule(MODELS[model], num_classes=5, bits=[1], alrs="off", optimizer=opt, lr=lr or default_lr,
                     momentum=momentum, weight_decay=recipe["weight_decay"],
                     quant={"weight_mode": "binary", "skip": SKIP[model]},
                     grad_quant=None if grad is None else {**grad, "seed": seed},
                     init_checkpoint=None if init is None else str(init))  # fmt: skip


def pretrain(model: str, recipe: dict[str, Any], smoke: bool) -> Path:
    """The W1A1 source-task checkpoint of ``model`` (FP32 pretraining first), cached in the run folder."""
    import lightning.pytorch as pl

    from experiments.cifar10.fp32 import FPClassifier
    from experiments.fqt.data import Batches

    out = RUNS / ("smoke" if smoke else "") / f"pretrain_{model}"
    w1a1 = out / "w1a1.ckpt"
    if w1a1.is_file():
        return w1a1
    data = _split(recipe)
    x, y = data["source"]
    n_val = len(y) // 10  # source-task monitoring only: the last 10 % of the (shuffled) source images
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[n_val:], perm[:n_val]
    log: dict[str, Any] = {}
    fp32 = out / "fp32.ckpt"
    if not fp32.is_file():
        pl.seed_everything(0)
        fp = FPClassifier(MODELS[model], 5, lr=recipe["fp32_lr"], weight_decay=recipe["weight_decay"])
        trainer = _trainer(recipe["fp32_epochs"], out)
        trainer.fit(fp, Batches(x[tr], y[tr], recipe["batch_size"], True), Batches(x[va], y[va], 256, False))
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": fp.state_dict()}, fp32)
        log["fp32_source_acc"] = float(trainer.callback_metrics["val/acc_fp32"])
    pl.seed_everything(0)
    module = _module(model, None, "adam", recipe, 0, lr=recipe["w1a1_lr"], init=fp32)
    trainer = _trainer(recipe["w1a1_epochs"], out)
    trainer.fit(module, Batches(x[tr], y[tr], recipe["batch_size"], True), Batches(x[va], y[va], 256, False))
    torch.save({"state_dict": module.state_dict()}, w1a1)
    log["w1a1_source_acc"] = float(trainer.callback_metrics["val/acc_w1a1"])
    (out / "pretrain.json").write_text(json.dumps(log, indent=2))
    return w1a1


def _load_backbone(module: Any, ckpt: Path) -> list[str]:
    """Load every tensor of ``ckpt`` but the classifier (the model's last Linear, re-initialised for the target
    task); returns the re-initialised keys."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    target = module.model.state_dict()
    head = [n for n, m in module.model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    fresh = sorted(k for k in target if k.startswith(f"{head}.") or k not in state)
    missing, unexpected = module.model.load_state_dict({k: v for k, v in state.items() if k not in fresh},
                                                       strict=False)  # fmt: skip
    if unexpected or sorted(missing) != fresh or not 1 <= len(fresh) <= 2:
        raise RuntimeError(f"backbone load: fresh {fresh}, missing {missing}, unexpected {unexpected}")
    return fresh


def gradient_profile(module: Any, batch: tuple[torch.Tensor, torch.Tensor], grad: dict[str, Any] | None,
                     draws: int, seed: int) -> dict[str, Any]:  # fmt: skip
    """Per-layer relative gradient variance vs exact, kept fraction and average bits on one fixed batch."""
    from lightning_dbq.fqt import enable_grad_quant, record_grad_stats
    from lightning_dbq.quant.layers import is_quant_layer

    net = copy.deepcopy(module.model).train()
    layers = [(n, m) for n, m in net.named_modules() if is_quant_layer(m)]
    x, y = batch

    def grads() -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        return {n: m.weight.grad.detach().clone() for n, m in layers}

    enable_grad_quant(net, None)
    exact = grads()
    if grad is None:
        return {"rel_var": dict.fromkeys(exact, 0.0), "kept_fraction": 1.0, "average_bits": 32.0}
    enable_grad_quant(net, {**grad, "seed": seed})
    err = dict.fromkeys(exact, 0.0)
    with record_grad_stats() as stats:
        for _ in range(draws):
            for name, g in grads().items():
                err[name] += float((g - exact[name]).pow(2).sum() / exact[name].pow(2).sum().clamp_min(1e-30)) / draws
    return {"rel_var": err, **stats.as_dict()}


def _memory(arm: Arm, recipe: dict[str, Any]) -> dict[str, Any]:
    from experiments.bench.memory_probe import run_probe

    return run_probe(
        {
            "model": MODELS[arm.model],
            "num_classes": 5,
            "bits": [1],
            "weight_mode": "binary",
            "skip": SKIP[arm.model],
            "grad": METHODS[arm.method],
            "batch_size": recipe["batch_size"],
        }
    )


def run_arm(arm: Arm, recipe: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """Fine-tune one arm from its model's W1A1 checkpoint; returns the result record."""
    import lightning.pytorch as pl

    from experiments.fqt.data import Batches, normalize
    from lightning_dbq.training.loop import DivergenceError

    init = pretrain(arm.model, recipe, smoke)
    data = _split(recipe)
    pl.seed_everything(arm.seed)
    grad = METHODS[arm.method]
    module = _module(arm.model, grad, arm.optimizer, recipe, arm.seed)
    fresh = _load_backbone(module, init)
    x, y = data["target"]
    probe = (normalize(x[: recipe["batch_size"]]), y[: recipe["batch_size"]])
    profile = gradient_profile(module, probe, grad, recipe["draws"], arm.seed)
    out = RUNS / ("smoke" if smoke else "") / arm.name
    trainer = _trainer(recipe["ft_epochs"], out)
    start = time.time()
    xv, yv = data["val"]
    diverged = None
    try:
        trainer.fit(module, Batches(x, y, recipe["batch_size"], True, seed=arm.seed), Batches(xv, yv, 250, False))
    except DivergenceError as e:  # an outcome of the arm (e.g. 1-bit PSQ on mobilenetv2), recorded, not hidden
        diverged = str(e)
    fit_s = time.time() - start
    acc = None if diverged else float(trainer.callback_metrics["val/acc_w1a1"])
    pre = json.loads((init.parent / "pretrain.json").read_text()) if (init.parent / "pretrain.json").is_file() else {}
    return {"arm": arm.name, **asdict(arm), "grad": grad, "optimizer_settings": OPTIMIZERS[arm.optimizer],
            "val_acc": acc, "diverged": diverged, "val_images": len(yv), "fit_s": round(fit_s, 1), "fresh_keys": fresh,
            "pretrain": pre, "gradient": profile, "memory": _memory(arm, recipe), "recipe": recipe}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run every arm without a cached result (or the ones named)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="", help="comma-separated arm names (default: every arm)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, results under experiments/results/fqt/smoke")
    parser.add_argument("--force", action="store_true", help="re-run arms even if cached")
    parser.add_argument("--memory-only", action="store_true",
                        help="re-measure only the step memory of cached arms (a fresh process each)")  # fmt: skip
    args = parser.parse_args(argv)
    recipe = SMOKE if args.smoke else RECIPE
    torch.set_num_threads(1)
    arms = {a.name: a for a in study_arms()}
    names = [n for n in args.arms.split(",") if n] or list(arms)
    unknown = sorted(set(names) - set(arms))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {list(arms)}")
    for name in names:
        path = RESULTS / ("smoke" if args.smoke else "") / f"{name}.json"
        if args.memory_only:
            if path.is_file():
                result = json.loads(path.read_text())
                result["memory"] = _memory(arms[name], recipe)
                path.write_text(json.dumps(result, indent=2))
                print(f"[fqt-study] {name}: memory {result['memory']}", flush=True)
            continue
        if path.is_file() and not args.force:
            print(f"[fqt-study] {name}: cached at {path.relative_to(ROOT)}")
            continue
        start = time.time()
        result = run_arm(arms[name], recipe, args.smoke)
        result.update({"device": "cpu (1 thread)", "elapsed_s": round(time.time() - start, 1)})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        acc = "diverged" if result["val_acc"] is None else f"{100 * result['val_acc']:.2f} %"
        print(f"[fqt-study] {name}: val {acc} in {result['elapsed_s']} s -> "
              f"{path.relative_to(ROOT)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
