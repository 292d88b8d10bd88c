"""DoubleRoundingQAT: the drop-in callback that makes an existing LightningModule bit-switchable.

``Trainer(callbacks=[DoubleRoundingQAT(bits=[8, 4, 2])])`` on a module that knows nothing of quantization:

* ``setup`` (before ``configure_optimizers`` and DDP wrapping, so new parameters are optimized and synced)
  prepares the model in place — idempotently, so ``fit`` → ``test`` and resume work;
* when the strategy is not a bit-switch strategy, the module's ``optimizer_step`` is wrapped (per instance) to run
  the same ``run_bit_loop`` the strategies use; never both at once;
* validation measures accuracy at every bit (``val/acc_w{b}a{b}``, ``val/acc_min``, ``val/acc_mean``) with one
  torchmetrics collection per bit, assuming batches ``(x, y)`` and a forward that returns logits (configurable).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_dbq.quant.prepare import get_spec, prepare
from lightning_dbq.quant.spec import validate_bits
from lightning_dbq.training.loop import check_training_setup, run_bit_loop
from lightning_dbq.training.metrics import PerBitMetrics
from lightning_dbq.training.state import BitLoopState, bit_label, get_state
from lightning_dbq.training.strategy import is_bit_switch_strategy

__all__ = ["DoubleRoundingQAT"]


def _default_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


class DoubleRoundingQAT(Callback):
    """Drop-in multi-precision QAT for any LightningModule.

    Args:
        bits: candidate bits.
        attr: attribute of the LightningModule holding the network to quantize (default: its only child that has
            parameters, else the LightningModule itself).
        quant: :func:`~lightning_dbq.prepare` options.
        algorithm: ``"A2"`` | ``"A1"``; ``alrs``: ``"paper"`` | ``"eq6"`` | ``"off"`` (needs the param groups of
            :func:`~lightning_dbq.training.alrs.param_groups` to act; otherwise scales share the user's groups).
        num_classes: classes for the per-bit accuracy (default: the model's ``num_classes`` attribute).
        batch_to_xy: maps a validation batch to ``(inputs, targets)``.
    """

    def __init__(
        self,
        bits: Sequence[int] = (8, 6, 4, 2),
        attr: str | None = None,
        quant: Mapping[str, Any] | None = None,
        algorithm: str = "A2",
        alrs: str = "paper",
        num_classes: int | None = None,
        batch_to_xy: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = _default_xy,
    ) -> None:
        self.bits = validate_bits(bits)
        self.attr = attr
        self.quant = dict(quant or {})
        self.algorithm = algorithm
        self.alrs = alrs
        self.num_classes = num_classes
        self.batch_to_xy = batch_to_xy
        self.metrics: PerBitMetrics | None = None
        BitLoopState(model=nn.Identity(), bits=self.bits, algorithm=algorithm, alrs=alrs)  # validate early

    @property
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.bits)

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.attr is not None:
            if not hasattr(pl_module, self.attr):
                raise AttributeError(
                    f"DoubleRoundingQAT(attr={self.attr!r}): {type(pl_module).__name__} has no such attribute"
                )
            return getattr(pl_module, self.attr)  # type: ignore[no-any-return]
        # the only child that owns parameters (e.g. `self.net`), so layer names and first/last rules are the model's
        owners = [m for m in pl_module.children() if any(True for _ in m.parameters())]
        return owners[0] if len(owners) == 1 else pl_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepare the model (idempotent) and install the per-bit loop when the strategy does not run it."""
        from lightning_dbq.training.module import DBQModule

        if isinstance(pl_module, DBQModule):
            raise RuntimeError("DoubleRoundingQAT is for plain LightningModules; DBQModule already trains every bit")
        target = self._target(pl_module)
        prepare(target, self.bits, **self.quant)
        if get_spec(target).bits != self.bits:
            raise RuntimeError(f"model already prepared with bits {get_spec(target).bits}, callback has {self.bits}")
        if not isinstance(getattr(pl_module, "dbq_state", None), BitLoopState):
            object.__setattr__(
                pl_module,
                "dbq_state",
                BitLoopState(model=target, bits=self.bits, algorithm=self.algorithm, alrs=self.alrs),
            )
        if not is_bit_switch_strategy(trainer.strategy) and not getattr(pl_module, "_dbq_loop_installed", False):
            original = pl_module.optimizer_step

            def optimizer_step(
                self: Any, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
            ) -> Any:
                return run_bit_loop(
                    self, lambda c: original(epoch, batch_idx, optimizer, c), optimizer_closure, optimizer
                )

            pl_module.optimizer_step = types.MethodType(optimizer_step, pl_module)  # type: ignore[method-assign]
            object.__setattr__(pl_module, "_dbq_loop_installed", True)
        n_classes = self.num_classes or getattr(target, "num_classes", None)
        if not isinstance(n_classes, int):
            raise ValueError("DoubleRoundingQAT: pass num_classes= (the model has no integer `num_classes`)")
        if self.metrics is None:
            self.metrics = PerBitMetrics(self.bits, n_classes)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Guards before the first batch (manual optimization, accumulation, DDP flags, optimizer coverage)."""
        state = get_state(pl_module)
        check_training_setup(pl_module, state)
        state.checked = True

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.metrics is not None
        self.metrics.to(pl_module.device)
        self.metrics.reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        assert self.metrics is not None
        state = get_state(pl_module)
        x, y = self.batch_to_xy(batch)
        for b in self.bits:
            state.activate(b, b)
            self.metrics.update(bit_label(b), pl_module(x), y)
        state.reset()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.metrics is not None
        pl_module.log_dict(self.metrics.compute("val"), sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "quant": dict(self.quant), "algorithm": self.algorithm, "alrs": self.alrs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if tuple(state_dict.get("bits", self.bits)) != self.bits:
            raise ValueError(f"checkpoint was trained with bits {state_dict['bits']}, callback has {list(self.bits)}")
