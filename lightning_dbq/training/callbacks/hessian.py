"""HessianTraces: per-layer Hutchinson traces before training (or loaded from a file), saved and logged.

Under DDP every rank takes an equal shard of the calibration images and its own probe seed (``seed + rank``); each
per-sample estimate is averaged across ranks before use, so every rank takes the same stopping decisions and ends
with the same traces, and the work is split instead of repeated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dbq.quant.prepare import quantized_layers
from lightning_dbq.search.hessian import LayerTrace
from lightning_dbq.search.profile import load_traces, plot_traces, profile_traces, save_traces, shard_batches
from lightning_dbq.training.state import get_state

__all__ = ["HessianTraces", "calibration_batches"]


def calibration_batches(
    trainer: pl.Trainer, num_images: int, batch_size: int, *, shard: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed un-augmented batches: the datamodule's ``calibration_batches`` or the first training batches.

    With ``shard=True`` each rank gets its equal share of the ``num_images`` images
    (:func:`~lightning_dbq.search.profile.shard_batches`); without a datamodule the training loader (already
    distinct per rank under a distributed sampler) gives each rank ``num_images // world_size`` images.
    """
    world, rank = (trainer.world_size, trainer.global_rank) if shard else (1, 0)
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and hasattr(dm, "calibration_batches"):
        batches = list(dm.calibration_batches(num_images=num_images, batch_size=batch_size))
        return shard_batches(batches, rank, world)
    loader = trainer.train_dataloader
    if loader is None:
        raise RuntimeError("calibration batches need a datamodule with calibration_batches() or a train dataloader")
    want = max(num_images // world, 1)
    out, seen = [], 0
    for batch in loader:
        out.append((batch[0], batch[1]))
        seen += len(batch[0])
        if seen >= want:
            break
    return out


class HessianTraces(Callback):
    """Compute per-layer traces at the start of training (after a resume they come from the checkpoint).

    Args:
        output_dir: where ``traces.json`` and ``traces.png`` go (``None``: not written).
        traces_path: load traces from this file instead of computing them.
        num_images: calibration images (~1000 as in the paper); ``batch_size`` per HVP batch.
        min_samples / max_samples / rel_tol / seed: Hutchinson stopping rule and probe seed.
        compute_at: ``"train_start"`` (FP32/initial model, the paper's choice for a pretrained model) or
            ``"demand"`` (when HASB or the search first asks, e.g. after a multi-precision warm-up: traces of a
            random-init network are mostly noise).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        traces_path: str | None = None,
        num_images: int = 1000,
        batch_size: int = 128,
        min_samples: int = 8,
        max_samples: int = 64,
        rel_tol: float = 0.05,
        seed: int = 0,
        compute_at: str = "train_start",
    ) -> None:
        if compute_at not in ("train_start", "demand"):
            raise ValueError(f"compute_at must be 'train_start' or 'demand', got {compute_at!r}")
        self.compute_at = compute_at
        self.output_dir = Path(output_dir) if output_dir else None
        self.traces_path = traces_path
        self.num_images, self.batch_size = num_images, batch_size
        self.min_samples, self.max_samples, self.rel_tol, self.seed = min_samples, max_samples, rel_tol, seed
        self.traces: dict[str, LayerTrace] | None = None
        self.images_used = 0  # calibration images this rank used (a shard of num_images under DDP)

    def ensure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, LayerTrace]:
        """Traces of the module's quantized layers: cached, loaded from ``traces_path``, or computed now."""
        if self.traces is not None:
            return self.traces
        model = get_state(pl_module).model
        names = [i.name for i in quantized_layers(model)]
        if self.traces_path:
            self.traces = load_traces(self.traces_path, names)
        else:
            mine = calibration_batches(trainer, self.num_images, self.batch_size, shard=True)
            batches = [(x.to(pl_module.device), y.to(pl_module.device)) for x, y in mine]
            self.images_used = sum(len(y) for _, y in batches)
            reduce_fn = None
            if trainer.world_size > 1:

                def reduce_fn(t: torch.Tensor) -> torch.Tensor:
                    return trainer.strategy.reduce(t, reduce_op="mean")  # type: ignore[no-any-return]

            self.traces = profile_traces(
                model, batches, min_samples=self.min_samples, max_samples=self.max_samples, rel_tol=self.rel_tol,
                seed=self.seed + trainer.global_rank, progress=trainer.is_global_zero, reduce_fn=reduce_fn,
            )  # fmt: skip
        self._publish(trainer)
        return self.traces

    def _publish(self, trainer: pl.Trainer) -> None:
        assert self.traces is not None
        if trainer.is_global_zero and self.output_dir is not None:
            save_traces(self.traces, self.output_dir / "traces.json")
            png = plot_traces(self.traces, self.output_dir / "traces.png")
            from lightning.pytorch.loggers import WandbLogger

            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="hessian_traces", images=[str(png)])
        for logger in trainer.loggers:
            logger.log_metrics({f"hessian/{n}": t.normalized for n, t in self.traces.items()}, step=0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compute_at == "train_start":
            self.ensure(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.traces is None:
            return {}
        return {"traces": {n: vars(t) for n, t in self.traces.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rows = state_dict.get("traces")
        if rows:
            self.traces = {n: LayerTrace(**r) for n, r in rows.items()}


def find_hessian_callback(trainer: pl.Trainer) -> HessianTraces | None:
    """The trainer's :class:`HessianTraces` callback, if any."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, HessianTraces):
            return cb
    return None
