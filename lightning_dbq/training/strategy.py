"""Bit-switch Strategies: SingleDeviceStrategy and DDPStrategy subclasses that run ``run_bit_loop``.

The per-bit loop lives in ``optimizer_step``: each bit's pass goes through the parent strategy's normal
``optimizer_step`` (precision plugin, clipping, DDP reducer). Registered names:

* ``dbq`` — single device (CUDA if available, else CPU);
* ``dbq_ddp`` — DDP (popen launcher) with ``find_unused_parameters=True``;
* ``dbq_ddp_spawn`` — DDP with the spawn launcher (notebooks, tests), ``find_unused_parameters=True``.

Strategies hold no state (bits come from the module's ``dbq_state``), so nothing is lost in checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch.optim import Optimizer

from lightning_dbq.training.loop import run_bit_loop

__all__ = ["BitSwitchDDPStrategy", "BitSwitchMixin", "BitSwitchSingleDeviceStrategy", "is_bit_switch_strategy"]


class BitSwitchMixin:
    """Runs :func:`~lightning_dbq.training.loop.run_bit_loop` around the parent's ``optimizer_step``."""

    lightning_module: Any

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """One batch: for each bit, the parent strategy's optimizer step with Lightning's closure."""
        parent = super()

        def step(c: Any) -> Any:
            return parent.optimizer_step(optimizer, c, model, **kwargs)  # type: ignore[attr-defined]

        return run_bit_loop(self.lightning_module, step, closure, optimizer)


class BitSwitchSingleDeviceStrategy(BitSwitchMixin, SingleDeviceStrategy):
    """Single-device bit-switch strategy (``Trainer(strategy="dbq")``)."""

    strategy_name = "dbq"

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        if device is None:
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        super().__init__(device=device, **kwargs)


class BitSwitchDDPStrategy(BitSwitchMixin, DDPStrategy):
    """DDP bit-switch strategy; ``find_unused_parameters`` defaults to True (required, see guards)."""

    strategy_name = "dbq_ddp"

    def __init__(self, *args: Any, find_unused_parameters: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, find_unused_parameters=find_unused_parameters, **kwargs)


def is_bit_switch_strategy(strategy: Any) -> bool:
    """True when ``strategy`` already runs the per-bit loop."""
    return isinstance(strategy, BitSwitchMixin)


def _register() -> None:
    if "dbq" not in StrategyRegistry:
        StrategyRegistry.register("dbq", BitSwitchSingleDeviceStrategy, description="lightning_dbq single device")
    if "dbq_ddp" not in StrategyRegistry:
        StrategyRegistry.register("dbq_ddp", BitSwitchDDPStrategy, description="lightning_dbq DDP")
    if "dbq_ddp_spawn" not in StrategyRegistry:
        StrategyRegistry.register(
            "dbq_ddp_spawn", BitSwitchDDPStrategy, description="lightning_dbq DDP (spawn)", start_method="spawn"
        )


_register()
