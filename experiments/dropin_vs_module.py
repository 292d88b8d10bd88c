"""Drop-in callback vs DBQModule on the main job's setting (digits 16 px, cifar_resnet20, 12 epochs, {8,6,4,2}).

The drop-in arm is a plain LightningModule written the way a user would (its own Adam with weight decay, its own
cosine schedule, torchmetrics) plus ``DoubleRoundingQAT``; the DBQModule arm uses the same hyperparameters (the
paper defaults: Adam lr 5e-4, weight decay 5e-5, cosine per step). Both run under the stock single-device strategy,
one CPU thread, seed 0. Writes ``experiments/results/dropin_vs_module.json`` and prints both tables.

    uv run python -m experiments.dropin_vs_module [--epochs 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

import lightning_dbq.models  # noqa: F401  (registers cifar_resnet20)
from lightning_dbq.data import DigitsDataModule
from lightning_dbq.training import DBQModule, DoubleRoundingQAT

BITS = [8, 6, 4, 2]
OUT = Path(__file__).parent / "results" / "dropin_vs_module.json"


class UserModule(pl.LightningModule):
    """What a user already has: a timm model, Adam + weight decay, cosine per step, torchmetrics."""

    def __init__(self, lr: float = 5e-4, weight_decay: float = 5e-5) -> None:
        super().__init__()
        self.net = timm.create_model("cifar_resnet20", num_classes=10, in_chans=3)
        self.lr, self.weight_decay = lr, weight_decay
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _run(arm: str, epochs: int, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=16, batch_size=64, seed=seed)
    callbacks: list[pl.Callback] = []
    module: pl.LightningModule
    if arm == "dbq_module":
        module = DBQModule("cifar_resnet20", num_classes=10, bits=BITS)
    else:
        module = UserModule()
        callbacks.append(DoubleRoundingQAT(bits=BITS, num_classes=10))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, dm)
    val = {f"w{b}a{b}": float(trainer.callback_metrics[f"val/acc_w{b}a{b}"]) for b in BITS}
    return {"val": val, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    """Run both arms and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {arm: _run(arm, args.epochs, args.seed) for arm in ("dbq_module", "dropin")}
    labels = [f"w{b}a{b}" for b in BITS]
    print("| arm | " + " | ".join(labels) + " | time |")
    print("|---|" + "---|" * (len(labels) + 1))
    for arm, r in results.items():
        print(f"| {arm} | " + " | ".join(f"{100 * r['val'][x]:.2f}" for x in labels) + f" | {r['seconds']} s |")
    diff = {x: round(100 * (results["dropin"]["val"][x] - results["dbq_module"]["val"][x]), 2) for x in labels}
    print("drop-in minus DBQModule (pt):", diff)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {"epochs": args.epochs, "seed": args.seed, "bits": BITS, "arms": results, "diff_pt": diff}
    OUT.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
