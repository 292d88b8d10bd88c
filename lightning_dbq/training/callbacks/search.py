"""SubNetSearch: the post-fit ILP/DP search, run in ``on_train_end`` on rank 0 and broadcast.

Builds the allocation problem from per-layer traces (the :class:`HessianTraces` callback's, or computed now on the
served grid weights), takes the front at the average-bit budgets, evaluates every SubNet on the validation set
without retraining, and writes ``pareto.json``, ``pareto.png`` and ``bit_heatmap.png`` (also logged to W&B when
active). The steps are :mod:`lightning_dbq.search.pipeline`'s, the same as ``dbq-search``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dbq.search.pipeline import (
    default_budgets,
    print_subnets,
    search_front,
    served_traces,
    write_search_outputs,
)
from lightning_dbq.training.callbacks.hessian import calibration_batches, find_hessian_callback
from lightning_dbq.training.state import get_state

__all__ = ["SubNetSearch", "default_budgets"]


class SubNetSearch(Callback):
    """Post-fit SubNet search (see module docstring).

    Args:
        output_dir: where the outputs go.
        budgets: average-bit budgets (default every 0.5 bit between the lowest and highest candidate).
        method: ``"dp"`` (exact front) or ``"ilp"`` (PuLP/CBC; needed with ``max_bops``).
        cost: ``"hawq"`` (trace × Double Rounding error) or ``"paper"`` (trace / bits).
        max_bops: optional BOPs cap.
        enumerate_alg2: add the paper's Algorithm 2 neighbours of every front point.
    """

    def __init__(
        self,
        output_dir: str,
        budgets: list[float] | None = None,
        method: str = "dp",
        cost: str = "hawq",
        max_bops: float | None = None,
        enumerate_alg2: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.budgets, self.method, self.cost = budgets, method, cost
        self.max_bops, self.enumerate_alg2 = max_bops, enumerate_alg2
        self.result: list[dict[str, Any]] | None = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self._run(trainer, pl_module) if trainer.is_global_zero else None
        self.result = trainer.strategy.broadcast(result, src=0)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        state = get_state(pl_module)
        model, device = state.model, pl_module.device
        state.reset()
        cb = find_hessian_callback(trainer)
        if cb is not None:
            traces = cb.ensure(trainer, pl_module)
        else:
            batches = [(x.to(device), y.to(device)) for x, y in calibration_batches(trainer, 1000, 128)]
            traces = served_traces(model, batches, progress=True)
        dm: Any = getattr(trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError("SubNetSearch needs a datamodule with val_dataloader() to evaluate SubNets")
        val = [(x, y) for x, y in dm.val_dataloader()]
        result = search_front(
            model, traces, val, budgets=self.budgets or default_budgets(state.bits), method=self.method,
            cost=self.cost, max_bops=self.max_bops, enumerate_alg2=self.enumerate_alg2, device=device,
        )  # fmt: skip
        paths = write_search_outputs(result, self.output_dir)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="search", images=[str(paths["pareto_png"]), str(paths["heatmap_png"])])
        print_subnets(result.subnets, result.n_layers)
        return result.rows()
