"""DoubleRoundingQAT: the drop-in callback that makes an existing LightningModule bit-switchable.

``Trainer(callbacks=[DoubleRoundingQAT(bits=[8, 4, 2])])`` on a module that knows nothing of quantization:

* ``setup`` (before ``configure_optimizers`` and DDP wrapping, so new parameters are optimized and synced)
  prepares the model in place — idempotently, so ``fit`` → ``test`` and resume work;
* ``on_fit_start`` (optimizers and schedulers exist; a checkpoint's optimizer state is not restored yet) moves the
  quantization scales out of the user's param groups into their own groups — weight decay 0, learning rate
  relative to the group they came from, tagged for ALRS — and extends every LR scheduler to the new groups
  (:mod:`lightning_dbq.training.regroup`);
* when the strategy is not a bit-switch strategy, the module *instance*'s ``optimizer_step`` is wrapped to run the
  same ``run_bit_loop`` the strategies use (the class is not modified; ``teardown`` removes the wrapper); never
  both at once;
* validation and test measure accuracy at every bit (``val/acc_w{b}a{b}``, ``val/acc_min``, ``val/acc_mean``,
  ``test/...``) with one torchmetrics collection per bit, assuming batches ``(x, y)`` and a forward that returns
  logits (configurable); training logs each bit's loss (``train/loss_w{b}a{b}``).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_dbq.fqt.config import GradQuantConfig
from lightning_dbq.fqt.enable import enable_grad_quant
from lightning_dbq.quant.prepare import get_spec, prepare
from lightning_dbq.quant.spec import validate_bits
from lightning_dbq.training.loop import check_strategy, check_training_setup, run_bit_loop
from lightning_dbq.training.metrics import PerBitMetrics
from lightning_dbq.training.regroup import extend_scheduler, split_scale_groups
from lightning_dbq.training.state import BitLoopState, bit_label, get_state
from lightning_dbq.training.strategy import is_bit_switch_strategy

__all__ = ["DoubleRoundingQAT"]

_INSTALLED = "_dbq_loop_installed"


def _default_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


class DoubleRoundingQAT(Callback):
    """Drop-in multi-precision QAT for any LightningModule.

    Args:
        bits: candidate bits.
        attr: attribute of the LightningModule holding the network to quantize (default: its only child that has
            parameters, else the LightningModule itself).
        quant: :func:`~lightning_dbq.prepare` options.
        algorithm: ``"A2"`` | ``"A1"``; ``alrs``: ``"paper"`` | ``"eq6"`` | ``"off"``.
        num_classes: classes for the per-bit accuracy (default: the model's ``num_classes`` attribute).
        batch_to_xy: maps a validation/test batch to ``(inputs, targets)``.
        regroup: move the quantization scales into their own param groups of the user's optimizer(s) (needed for
            ALRS and for weight decay 0 on scales). With ``False`` the scales train with the settings of the
            groups they are in, and a warning says so once when ALRS is on.
        scale_lr_factor: learning rate of the scale groups relative to the group each scale came from.
        scale_weight_decay: weight decay of the scale groups (the method uses 0).
        nonfinite: a NaN/inf loss ``"stop"``s training with an error naming the bit, or ``"skip"``s that step.
        max_loss: a finite loss above this counts as diverged too (default ``None``: your loss's scale is yours).
        grad_quant: fully quantized training: a :class:`~lightning_dbq.fqt.GradQuantConfig` or a mapping of its
            fields, applied with :func:`~lightning_dbq.fqt.enable_grad_quant` after preparation (``None``: exact).
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
        regroup: bool = True,
        scale_lr_factor: float = 1.0,
        scale_weight_decay: float = 0.0,
        nonfinite: str = "stop",
        max_loss: float | None = None,
        grad_quant: GradQuantConfig | Mapping[str, Any] | None = None,
    ) -> None:
        self.bits = validate_bits(bits)
        if grad_quant is not None and not isinstance(grad_quant, GradQuantConfig):
            grad_quant = GradQuantConfig.from_mapping(grad_quant)
        self.grad_quant: GradQuantConfig | None = grad_quant
        self.attr = attr
        self.quant = dict(quant or {})
        self.algorithm = algorithm
        self.alrs = alrs
        self.num_classes = num_classes
        self.batch_to_xy = batch_to_xy
        if isinstance(scale_lr_factor, bool) or not isinstance(scale_lr_factor, (int, float)) or scale_lr_factor < 0:
            raise ValueError(f"scale_lr_factor must be a number >= 0, got {scale_lr_factor!r}")
        if isinstance(scale_weight_decay, bool) or not isinstance(scale_weight_decay, (int, float)):
            raise ValueError(f"scale_weight_decay must be a number, got {scale_weight_decay!r}")
        self.regroup = bool(regroup)
        self.scale_lr_factor = float(scale_lr_factor)
        self.scale_weight_decay = float(scale_weight_decay)
        self.metrics: PerBitMetrics | None = None
        self.test_metrics: PerBitMetrics | None = None
        self.nonfinite, self.max_loss = nonfinite, max_loss
        BitLoopState(model=nn.Identity(), bits=self.bits, algorithm=algorithm, alrs=alrs, nonfinite=nonfinite)

    @property
    @override
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

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepare the model (idempotent) and install the per-bit loop when the strategy does not run it."""
        from lightning_dbq.training.module import DBQModule

        check_strategy(trainer.strategy)
        if isinstance(pl_module, DBQModule):
            raise RuntimeError("DoubleRoundingQAT is for plain LightningModules; DBQModule already trains every bit")
        target = self._target(pl_module)
        prepare(target, self.bits, **self.quant)
        if get_spec(target).bits != self.bits:
            raise RuntimeError(f"model already prepared with bits {get_spec(target).bits}, callback has {self.bits}")
        if self.grad_quant is not None:
            enable_grad_quant(target, self.grad_quant)
        if not isinstance(getattr(pl_module, "dbq_state", None), BitLoopState):
            object.__setattr__(
                pl_module,
                "dbq_state",
                BitLoopState(
                    model=target, bits=self.bits, algorithm=self.algorithm, alrs=self.alrs, nonfinite=self.nonfinite
                ),  # fmt: skip
            )
        if not is_bit_switch_strategy(trainer.strategy) and not getattr(pl_module, _INSTALLED, False):
            original = pl_module.optimizer_step

            def optimizer_step(
                self: Any, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
            ) -> Any:
                return run_bit_loop(
                    self, lambda c: original(epoch, batch_idx, optimizer, c), optimizer_closure, optimizer
                )

            pl_module.optimizer_step = types.MethodType(optimizer_step, pl_module)  # type: ignore[method-assign]
            object.__setattr__(pl_module, _INSTALLED, True)
        n_classes = self.num_classes or getattr(target, "num_classes", None)
        if not isinstance(n_classes, int):
            raise ValueError("DoubleRoundingQAT: pass num_classes= (the model has no integer `num_classes`)")
        if self.metrics is None:
            self.metrics = PerBitMetrics(self.bits, n_classes)
            self.test_metrics = PerBitMetrics(self.bits, n_classes)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the per-instance ``optimizer_step`` wrapper (the module's class method is visible again)."""
        if getattr(pl_module, _INSTALLED, False):
            pl_module.__dict__.pop("optimizer_step", None)
            object.__setattr__(pl_module, _INSTALLED, False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the scales into their own param groups and extend the LR schedulers to them."""
        state = get_state(pl_module)
        if not self.regroup:
            if self.alrs != "off":
                rank_zero_warn(
                    "DoubleRoundingQAT(regroup=False): quantization scales train with the learning rate and weight "
                    f"decay of the groups they are in; ALRS (alrs={self.alrs!r}) acts only on scales in groups "
                    "built by lightning_dbq.training.alrs.param_groups."
                )
            return
        for optimizer in trainer.optimizers:
            try:
                split = split_scale_groups(
                    optimizer, state.model, lr_factor=self.scale_lr_factor, weight_decay=self.scale_weight_decay
                )
            except TypeError as e:
                rank_zero_warn(
                    f"DoubleRoundingQAT could not give the quantization scales their own param groups: {e}. They "
                    "train with that group's learning rate and weight decay, and ALRS cannot act on them."
                )
                continue
            if not split.sources:
                continue
            for config in trainer.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is not optimizer:
                    continue
                unknown = extend_scheduler(config.scheduler, split, self.scale_lr_factor)
                if unknown:
                    rank_zero_warn(
                        f"DoubleRoundingQAT: the LR scheduler {type(config.scheduler).__name__} keeps per-group "
                        f"state {unknown} that lightning_dbq does not know how to extend to the scale groups; "
                        "it may not drive them."
                    )
            rank_zero_info(
                f"DoubleRoundingQAT: {split.moved} quantization scales moved into {len(split.sources)} param "
                f"group(s) of {type(optimizer).__name__} (lr x{self.scale_lr_factor:g} of their source group, "
                f"weight decay {self.scale_weight_decay:g}, ALRS {self.alrs!r})"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Guards before the first batch (manual optimization, accumulation, DDP flags, optimizer coverage)."""
        state = get_state(pl_module)
        check_training_setup(pl_module, state)
        state.checked = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log each configuration's loss of this batch (``train/loss_w{b}a{b}``)."""
        state = get_state(pl_module)
        for label, loss in state.losses.items():
            pl_module.log(f"train/loss_{label}", loss, on_step=True, on_epoch=True)
        state.losses.clear()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.metrics is not None
        self.metrics.to(pl_module.device)
        self.metrics.reset()

    @override
    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        assert self.metrics is not None
        self._update(pl_module, batch, self.metrics)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.metrics is not None
        pl_module.log_dict(self.metrics.compute("val"), sync_dist=False)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.test_metrics is not None
        self.test_metrics.to(pl_module.device)
        self.test_metrics.reset()

    @override
    @torch.no_grad()
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        assert self.test_metrics is not None
        self._update(pl_module, batch, self.test_metrics)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.test_metrics is not None
        pl_module.log_dict(self.test_metrics.compute("test"), sync_dist=False)

    def _update(self, pl_module: pl.LightningModule, batch: Any, metrics: PerBitMetrics) -> None:
        state = get_state(pl_module)
        x, y = self.batch_to_xy(batch)
        for b in self.bits:
            state.activate(b, b)
            metrics.update(bit_label(b), pl_module(x), y)
        state.reset()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits), "quant": dict(self.quant), "algorithm": self.algorithm, "alrs": self.alrs,
            "scale_lr_factor": self.scale_lr_factor, "scale_weight_decay": self.scale_weight_decay,
            "grad_quant": self.grad_quant.to_dict() if self.grad_quant is not None else None,
        }  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if tuple(state_dict.get("bits", self.bits)) != self.bits:
            raise ValueError(f"checkpoint was trained with bits {state_dict['bits']}, callback has {list(self.bits)}")
