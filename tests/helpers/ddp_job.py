"""A 2-process CPU (gloo) DDP job for tests: ``python -m tests.helpers.ddp_job MODE OUT_DIR``.

MODE: ``module`` (DBQModule + dbq_ddp_spawn), ``dropin`` (plain module + DoubleRoundingQAT + stock DDP),
``no_find_unused`` (stock DDP without find_unused_parameters: must fail with our guard), ``hessian``
(DBQModule + HessianTraces on 64 calibration images, one epoch). Each rank writes
``rank{r}.json`` with its backward-pass count, batch count, a hash of the full state dict and logged metrics.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from lightning_dbq.data import SyntheticDataModule
from lightning_dbq.training import DBQModule, DoubleRoundingQAT
from lightning_dbq.training.callbacks import HessianTraces
from tests.helpers.tiny import PlainClassifier, TinyNet


class _Dump(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        h = hashlib.sha256()
        for k, v in pl_module.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        calls = pl_module.dbq_state.backward_calls if hasattr(pl_module, "dbq_state") else 0
        calls = getattr(pl_module, "backward_calls", 0) or calls
        row = {
            "rank": trainer.global_rank,
            "batches": self.batches,
            "backward_calls": calls,
            "state_hash": h.hexdigest(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        hessian = [cb for cb in trainer.callbacks if isinstance(cb, HessianTraces)]  # type: ignore[attr-defined]
        if hessian and hessian[0].traces is not None:
            row["hessian_images"] = hessian[0].images_used
            row["traces"] = {n: t.trace for n, t in hessian[0].traces.items()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    dm = SyntheticDataModule(num_samples=128, num_classes=4, image_size=8, batch_size=16, seed=0)
    callbacks: list[Callback] = [_Dump(out)]
    if mode == "module":
        module: pl.LightningModule = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], lr=5e-3)
        strategy: object = "dbq_ddp_spawn"
    elif mode == "dropin":
        module = PlainClassifier()
        callbacks.append(DoubleRoundingQAT(bits=[8, 4, 2], num_classes=4))
        strategy = DDPStrategy(find_unused_parameters=True, start_method="spawn")
    elif mode == "hessian":
        module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2], lr=5e-3)
        strategy = "dbq_ddp_spawn"
        callbacks.append(HessianTraces(num_images=64, batch_size=16, min_samples=4, max_samples=8))
    elif mode == "no_find_unused":
        module = DBQModule(TinyNet(), num_classes=4, bits=[8, 4, 2])
        strategy = DDPStrategy(find_unused_parameters=False, start_method="spawn")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1 if mode == "hessian" else 2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, dm)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
