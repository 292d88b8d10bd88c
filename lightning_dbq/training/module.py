"""DBQModule: a LightningModule that wraps a timm model (or any nn.Module) and trains it at every bit."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_dbq.fqt.config import GradQuantConfig
from lightning_dbq.fqt.enable import enable_grad_quant
from lightning_dbq.quant.factory import create_fp_model
from lightning_dbq.quant.prepare import prepare
from lightning_dbq.quant.spec import validate_bits
from lightning_dbq.training.alrs import param_groups
from lightning_dbq.training.distill import kd_loss
from lightning_dbq.training.loop import check_strategy, check_training_setup, run_bit_loop
from lightning_dbq.training.metrics import PerBitMetrics
from lightning_dbq.training.state import BitLoopState, bit_label
from lightning_dbq.training.strategy import is_bit_switch_strategy

__all__ = ["DBQModule", "OPTIMIZERS", "SCHEDULERS"]

from lightning_dbq.options import OPTIMIZERS, SCHEDULERS  # noqa: E402


class DBQModule(pl.LightningModule):
    """Multi-precision (Double Rounding) training of one model at every candidate bit.

    Defaults follow the paper: Adam, lr 5e-4, weight decay 5e-5, cosine schedule, no warm-up; Algorithm A.2 with
    ALRS; per-bit BatchNorm and activation scales. Works under any Lightning strategy: with a bit-switch strategy
    (``dbq``, ``dbq_ddp``) the strategy runs the per-bit loop, otherwise this module's ``optimizer_step`` does.

    Args:
        model: a timm model name (built with ``pretrained=False``) or an ``nn.Module`` (not saved in hparams; pass it
            again to ``load_from_checkpoint``).
        num_classes: classes (passed to timm).
        in_chans: input channels (passed to timm).
        model_kwargs: more ``timm.create_model`` kwargs.
        bits: candidate bits, e.g. ``[8, 6, 4, 2]``.
        quant: :func:`~lightning_dbq.prepare` options (``per_channel``, ``quantize_first``, ``skip``, ...).
        algorithm: ``"A2"`` (per-bit steps) or ``"A1"`` (accumulate all bits, one step).
        alrs: ``"paper"`` (η_b), ``"eq6"`` or ``"off"``.
        kd: progressive in-place distillation; ``kd_weight`` scales the KD term.
        optimizer: ``adam`` | ``adamw`` | ``sgd``; ``lr``, ``weight_decay``, ``momentum`` (SGD).
        scale_lr: learning rate of the quantization scales (default: ``lr``).
        latent_lr: learning rate of the latent weights of modes with a floor (binary); default
            ``max(lr, min_useful_lr)`` of the mode (binary: 1e-2). Other modes ignore it.
        scheduler: ``cosine`` (per step, over the whole fit) | ``onecycle`` | ``none``.
        label_smoothing: cross-entropy label smoothing.
        init_checkpoint: optional path of a Lightning checkpoint or FP32 state dict to initialise weights from
            (e.g. an FP32 model, as the paper initialises every quantized arm).
        nonfinite: a NaN/inf training loss ``"stop"``s the run with an error naming the bit (default) or
            ``"skip"``s that bit's step.
        max_loss: a finite loss above this counts as diverged too (default 1e3: cross-entropy starts near
            ``ln(num_classes)``, so 1e3 only trips on a blown-up run; ``None``: NaN/inf only).
        grad_quant: fully quantized training: a :class:`~lightning_dbq.fqt.GradQuantConfig` or a mapping of its
            fields (``bits``, ``method``, ``keep``, ``scq``, ``seed``) applied to every quantized layer with
            :func:`~lightning_dbq.fqt.enable_grad_quant` (``None``: exact gradients). Independent of the forward bits.
    """

    def __init__(
        self,
        model: str | nn.Module = "cifar_resnet20",
        num_classes: int = 10,
        in_chans: int = 3,
        model_kwargs: Mapping[str, Any] | None = None,
        bits: Sequence[int] = (8, 6, 4, 2),
        quant: Mapping[str, Any] | None = None,
        algorithm: str = "A2",
        alrs: str = "paper",
        alrs_act_scales: bool = False,
        kd: bool = False,
        kd_weight: float = 1.0,
        optimizer: str = "adam",
        lr: float = 5e-4,
        weight_decay: float = 5e-5,
        momentum: float = 0.9,
        scale_lr: float | None = None,
        latent_lr: float | None = None,
        scheduler: str = "cosine",
        label_smoothing: float = 0.0,
        init_checkpoint: str | None = None,
        nonfinite: str = "stop",
        max_loss: float | None = 1e3,
        grad_quant: GradQuantConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(grad_quant, GradQuantConfig):
            grad_quant = grad_quant.to_dict()  # plain values in hparams / checkpoints
        gq_config = GradQuantConfig.from_mapping(grad_quant) if grad_quant is not None else None
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        bits = validate_bits(bits, "bits")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if latent_lr is not None and not latent_lr > 0:
            raise ValueError(f"latent_lr must be > 0 (or None: the weight mode's floor), got {latent_lr!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if isinstance(model, str):
            net = create_fp_model(model, num_classes=num_classes, in_chans=in_chans, **dict(model_kwargs or {}))
        else:
            net = model
        out_features = getattr(net, "num_classes", None)
        if isinstance(out_features, int) and out_features != num_classes:
            raise ValueError(f"model has num_classes={out_features} but num_classes={num_classes} was given")
        init_state = _read_state(init_checkpoint) if init_checkpoint else None
        quantized_init = init_state is not None and any(".weight_quant." in k for k in init_state)
        if init_state is not None and not quantized_init:
            _load_into(net, init_state, str(init_checkpoint))  # FP32 weights, before preparation
        self.model = prepare(net, bits, **dict(quant or {}))
        if gq_config is not None:
            enable_grad_quant(self.model, gq_config)
        if init_state is not None and quantized_init:  # a multi-precision checkpoint (e.g. before HASB)
            _load_into(self.model, _per_bit_to_transitional(init_state, self.model.state_dict()), str(init_checkpoint))
        self.dbq_state = BitLoopState(model=self.model, bits=bits, algorithm=algorithm, alrs=alrs,
                                      alrs_act_scales=alrs_act_scales, kd=kd, nonfinite=nonfinite,
                                      max_loss=max_loss)  # fmt: skip
        self.val_metrics = PerBitMetrics(bits, num_classes)
        self.test_metrics = PerBitMetrics(bits, num_classes)

    @property
    def hparams_any(self) -> Any:
        """``self.hparams`` typed loosely (attribute access)."""
        return self.hparams

    @property
    def bits(self) -> tuple[int, ...]:
        """Candidate bits, descending."""
        return self.dbq_state.bits

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the currently active bits."""
        return self.model(x)  # type: ignore[no-any-return]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Loss at the active bit (the per-bit loop calls this once per bit)."""
        x, y = batch[0], batch[1]
        state, hp = self.dbq_state, self.hparams_any
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        if state.kd and state.teacher_logits is not None:
            loss = loss + hp.kd_weight * kd_loss(logits, state.teacher_logits)
        state.teacher_logits = logits.detach() if state.kd else None
        state.backward_calls += 1
        label = state.active_label or bit_label(state.bits[0])
        self.log(f"train/loss_{label}", loss, on_step=True, on_epoch=True, prog_bar=state.active_bits == state.bits[-1])
        return loss

    @override
    def setup(self, stage: str) -> None:
        """Refuse sharded strategies (FSDP, DeepSpeed) before anything is wrapped."""
        check_strategy(self.trainer.strategy)

    @override
    def on_train_start(self) -> None:
        """Run the loop's guards before the first batch (manual optimization would never reach the loop)."""
        check_training_setup(self, self.dbq_state)
        self.dbq_state.checked = True

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Run the per-bit loop here unless the strategy already does."""
        if is_bit_switch_strategy(self.trainer.strategy):
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        run_bit_loop(self, lambda c: optimizer.step(closure=c), optimizer_closure, optimizer)
        return None

    def _eval_step(self, batch: Any, metrics: PerBitMetrics) -> None:
        x, y = batch[0], batch[1]
        for b in self.bits:
            self.dbq_state.activate(b, b)
            metrics.update(bit_label(b), self(x), y)
        self.dbq_state.reset()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accuracy at every bit."""
        self._eval_step(batch, self.val_metrics)

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc_w{b}a{b}``, ``val/acc_min``, ``val/acc_mean``."""
        self.log_dict(self.val_metrics.compute("val"), prog_bar=False)
        self.val_metrics.reset()

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accuracy at every bit."""
        self._eval_step(batch, self.test_metrics)

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test/acc_w{b}a{b}``, ``test/acc_min``, ``test/acc_mean``."""
        self.log_dict(self.test_metrics.compute("test"))
        self.test_metrics.reset()

    @override
    def configure_optimizers(self) -> Any:
        """Paper defaults: Adam(lr 5e-4, wd 5e-5) + cosine over the whole fit; scales in their own groups (ALRS)."""
        hp = self.hparams_any
        groups = param_groups(self.model, lr=hp.lr, weight_decay=hp.weight_decay, scale_lr=hp.scale_lr,
                              latent_lr=hp.get("latent_lr"))  # fmt: skip
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        else:
            opt = torch.optim.Adam(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched: Any
        if hp.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _read_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a Lightning checkpoint of a module holding ``model`` (prefix stripped) or a raw one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty, truncated or non-checkpoint file (e.g. an int artifact), named in the message.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"init_checkpoint: no such file: {path}")
    if p.stat().st_size == 0:
        raise ValueError(f"init_checkpoint={path!r} is an empty file")
    if p.name.endswith(".safetensors"):
        raise ValueError(f"init_checkpoint={path!r} is a safetensors file; use lightning_dbq.load_int for int "
                         "artifacts, init_checkpoint takes a Lightning .ckpt or a torch state dict")  # fmt: skip
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, UnpicklingError, zipfile errors, KeyError: all mean "not a checkpoint"
        raise ValueError(
            f"init_checkpoint={path!r} is not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"init_checkpoint={path!r} holds a {type(ckpt).__name__}, not a checkpoint/state dict")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init_checkpoint={path!r} has no tensor state dict")
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return dict(state)


def _per_bit_to_transitional(state: dict[str, torch.Tensor], target: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map PerBitNorm keys ``X.norms.{b}.*`` onto TransitionalNorm keys ``X.norms.{p}_{b}.*`` (every p)."""
    out = dict(state)
    for key in target:
        if key in out:
            continue
        m = re.match(r"(.*)\.norms\.(\d+)_(\d+)\.(.*)$", key)
        if m and f"{m.group(1)}.norms.{m.group(3)}.{m.group(4)}" in state:
            out[key] = state[f"{m.group(1)}.norms.{m.group(3)}.{m.group(4)}"]
    for key in [k for k in out if k not in target and re.search(r"\.norms\.\d+\.", k)]:
        del out[key]
    return out


def _load_into(net: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"init_checkpoint={path!r} does not match the model: {e}") from e
    if unexpected or missing:
        raise ValueError(
            f"init_checkpoint={path!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
