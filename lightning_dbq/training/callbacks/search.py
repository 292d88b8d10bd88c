"""SubNetSearch: the post-fit ILP/DP search, run in ``on_train_end`` on rank 0 and broadcast.

Builds the allocation problem from per-layer traces (the :class:`HessianTraces` callback's, or computed now),
takes the front at the average-bit budgets, evaluates every SubNet on the validation set without retraining, and
writes ``pareto.json``, ``pareto.png`` and ``bit_heatmap.png`` (also logged to W&B when active).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dbq.quant.prepare import quantized_layers
from lightning_dbq.search.plots import plot_bit_heatmap, plot_pareto
from lightning_dbq.search.profile import profile_traces
from lightning_dbq.search.subnet import build_problem, evaluate, search_subnets, write_pareto
from lightning_dbq.training.callbacks.hessian import calibration_batches, find_hessian_callback
from lightning_dbq.training.state import get_state

__all__ = ["SubNetSearch", "default_budgets"]


def default_budgets(bits: tuple[int, ...], step: float = 0.5) -> list[float]:
    """``min(bits), min(bits) + step, ..., max(bits)``."""
    return [float(x) for x in np.arange(min(bits), max(bits) + 1e-9, step)]


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
            traces = profile_traces(model, batches, progress=True)
        dm: Any = getattr(trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError("SubNetSearch needs a datamodule with val_dataloader() to evaluate SubNets")
        val = [(x, y) for x, y in dm.val_dataloader()]
        problem = build_problem(model, traces, val[0][0].to(device), cost=self.cost)
        subnets = search_subnets(
            model, problem, val, self.budgets or default_budgets(state.bits), method=self.method,
            max_bops=self.max_bops, enumerate_alg2=self.enumerate_alg2, device=device,
        )  # fmt: skip
        uniform = {b: evaluate(model, b, val, device) for b in state.bits}
        write_pareto(subnets, self.output_dir / "pareto.json")
        pngs = [plot_pareto(subnets, self.output_dir / "pareto.png", uniform=uniform),
                plot_bit_heatmap(subnets, self.output_dir / "bit_heatmap.png")]  # fmt: skip
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="search", images=[str(p) for p in pngs])
        _print(subnets, len(quantized_layers(model)))
        return [s.to_json() for s in subnets]


def _print(subnets: list[Any], n_layers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"searched SubNets ({n_layers} layers)")
    for col in ("avg bits", "GBOPs", "val acc"):
        table.add_column(col, justify="right")
    for s in subnets:
        table.add_row(f"{s.avg_bits:.2f}", f"{s.bops / 1e9:.3f}", f"{100 * s.acc:.2f} %")
    Console().print(table)
