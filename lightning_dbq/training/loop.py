"""``run_bit_loop``: THE per-bit forward/backward/step driver (paper Algorithms A.1 and A.2).

Every entry point — the bit-switch Strategies, ``DBQModule.optimizer_step`` under a stock strategy, and the
``DoubleRoundingQAT`` callback — calls this one function with a ``step_fn`` that performs one ordinary Lightning
optimizer step for a given closure. Each closure call re-runs ``training_step`` + ``zero_grad`` + backward through
the normal Lightning machinery (precision plugin, clipping, DDP reducer), so ``global_step`` still counts batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lightning_dbq.training.alrs import GROUP_KEY, alrs_factor, eq6_factor, scaled_scale_lr
from lightning_dbq.training.state import BitConfig, BitLoopState, get_state

__all__ = ["UNSUPPORTED_STRATEGIES", "DivergenceError", "check_strategy", "check_training_setup", "run_bit_loop"]


class DivergenceError(FloatingPointError):
    """The training loss became NaN or infinite (``nonfinite="stop"``, the default)."""


# sharded strategies: parameters are flattened/sharded, so per-layer scales, per-bit norms and the per-bit steps
# on unused parameters do not map onto them (checked by class name: these classes import optional packages)
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(strategy: Any) -> None:
    """Refuse sharded strategies (FSDP, DeepSpeed, model parallel) with a clear error.

    Raises:
        RuntimeError: ``strategy`` is (a subclass of) one of :data:`UNSUPPORTED_STRATEGIES`.
    """
    names = {c.__name__ for c in type(strategy).__mro__}
    bad = sorted(names.intersection(UNSUPPORTED_STRATEGIES))
    if bad:
        raise RuntimeError(
            f"lightning_dbq does not support the {bad[0]} strategy (sharded parameters): bit switching needs every "
            "rank to hold whole layers with their per-bit scales and norms. Use a single device, DDP "
            "(strategy='dbq_ddp' or DDPStrategy(find_unused_parameters=True)) or the 'dbq' strategies."
        )


def _ddp_find_unused(strategy: Any) -> bool | None:
    """``find_unused_parameters`` of the DDP wrapper the strategy built (public attribute of torch's DDP), or
    ``None`` when the model is not wrapped in DDP."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = getattr(strategy, "model", None)
    if not isinstance(wrapped, DistributedDataParallel):
        return None
    return bool(wrapped.find_unused_parameters)


def check_training_setup(module: Any, state: BitLoopState) -> None:
    """Guards with clear errors (run before the first step).

    Raises:
        RuntimeError: manual optimization, ``accumulate_grad_batches != 1``, DDP without
            ``find_unused_parameters=True``, or quantization parameters missing from the optimizer (layers
            quantized after ``configure_optimizers``).
    """
    if not module.automatic_optimization:
        raise RuntimeError(
            "lightning_dbq's per-bit loop needs automatic optimization; with `automatic_optimization = False` the "
            "strategy would repeat your optimizer.step on the same gradients. Loop over bits in your training_step "
            "instead (lightning_dbq.set_bits + manual_backward)."
        )
    trainer = module.trainer
    check_strategy(trainer.strategy)
    if trainer.accumulate_grad_batches != 1:
        raise RuntimeError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not supported by the per-bit "
            "loop (micro-batches would run at a stale bit and leak gradients between bits); use 1"
        )
    if _ddp_find_unused(trainer.strategy) is False:
        raise RuntimeError(
            "DDP needs find_unused_parameters=True for bit switching (each bit's norms and scales are unused in the "
            "other bits' passes): use strategy='dbq_ddp' or DDPStrategy(find_unused_parameters=True)"
        )
    in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in state.model.named_parameters() if p.requires_grad and id(p) not in in_opt]
    if missing:
        raise RuntimeError(
            f"{len(missing)} trainable parameter(s) of the quantized model are not in any optimizer, "
            f"e.g. {missing[:4]}: layers were quantized after configure_optimizers "
            "(quantize in __init__ or Callback.setup)"
        )


def _grad_snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def run_bit_loop(
    module: Any,
    step_fn: Callable[[Callable[[], Any]], Any],
    closure: Callable[[], Any],
    optimizer: Any,
) -> Any:
    """Run one batch over every bit configuration.

    Args:
        module: the LightningModule (holds ``dbq_state``).
        step_fn: performs ONE optimizer step with the given closure (e.g. ``lambda c: optimizer.step(closure=c)``).
        closure: Lightning's closure (training_step + zero_grad + backward).
        optimizer: the optimizer (its param groups are tagged by :func:`~lightning_dbq.training.alrs.param_groups`).

    Returns:
        The value of the last step.
    """
    state = get_state(module)
    if not state.checked:
        check_training_setup(module, state)
        state.checked = True
    configs = state.configs(int(module.trainer.global_step))
    high = state.bits[0]
    closure = _recording(closure, state, optimizer, int(module.trainer.global_step))
    groups = ("weight_scales", "act_scales") if state.alrs_act_scales else ("weight_scales",)
    try:
        if state.algorithm == "A1":
            return step_fn(_accumulating_closure(state, configs, closure, optimizer, groups))
        out = None
        for bits, config in configs:
            state.activate(bits, config)
            eta = 1.0 if state.alrs == "off" else alrs_factor(bits, high)
            if state.alrs == "eq6":
                with _restore_lrs(optimizer):
                    out = step_fn(_eq6_closure(closure, optimizer, eta, groups))
            else:
                per_layer = _per_layer_eta(config, high) if state.alrs != "off" else None
                with scaled_scale_lr(optimizer, eta, groups, per_layer=per_layer):
                    out = step_fn(closure)
        return out
    finally:
        state.reset()


def _recording(closure: Callable[[], Any], state: BitLoopState, optimizer: Any, step: int) -> Callable[[], Any]:
    """The closure, recording each configuration's loss in ``state.losses`` (logged per bit by the callback) and
    applying the non-finite-loss policy: ``"stop"`` raises :class:`DivergenceError` naming the bit, ``"skip"``
    drops that bit's gradients so its optimizer step changes nothing."""

    def run() -> Any:
        out = closure()
        if isinstance(out, torch.Tensor):
            loss = out.detach()
            value = float(loss.float().mean())  # one host sync per bit: NaN/inf propagate through the mean
            finite = math.isfinite(value)
            if not finite or (state.max_loss is not None and value > state.max_loss):
                if state.nonfinite == "stop":
                    what = "" if finite else " (not finite)"
                    raise DivergenceError(
                        f"training diverged: the loss is {value:.4g}{what} at "
                        f"{state.active_label} (global step {step}; limit max_loss={state.max_loss}). Lower the "
                        "learning rate (or the scale learning rate), or set nonfinite='skip' to drop such steps."
                    )
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                state.skipped_steps += 1
            state.losses[state.active_label] = loss
        return out

    return run


def _per_layer_eta(config: BitConfig, high: int) -> dict[str, float] | None:
    """Mixed precision: ALRS keys on each layer's sampled bits."""
    if isinstance(config, int):
        return None
    return {name: alrs_factor(b, high) for name, b in config.items()}


@contextlib.contextmanager
def _restore_lrs(optimizer: Any) -> Iterator[None]:
    saved = [g["lr"] for g in optimizer.param_groups]
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved, strict=True):
            g["lr"] = lr


def _eq6_closure(closure: Callable[[], Any], optimizer: Any, eta: float, groups: tuple[str, ...]) -> Callable[[], Any]:
    """Run the closure, then set the scale groups' lr from eq. 6 using the fresh scale gradients."""

    def wrapped() -> Any:
        out = closure()
        for g in optimizer.param_groups:
            if g.get(GROUP_KEY) in groups:
                g["lr"] = g["lr"] * eq6_factor(eta, g["lr"], [p.grad for p in g["params"]])
        return out

    return wrapped


def _accumulating_closure(
    state: BitLoopState,
    configs: list[tuple[int, BitConfig]],
    closure: Callable[[], Any],
    optimizer: Any,
    groups: tuple[str, ...],
) -> Callable[[], Any]:
    """Algorithm A.1: every bit's forward/backward, gradients summed, then one step.

    ALRS in A.1 scales each bit's contribution to the shared weight-scale gradient by η_b (there is one step, so
    there is no per-bit learning rate to set).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scale_ids = {id(p) for g in optimizer.param_groups if g.get(GROUP_KEY) in groups for p in g["params"]}

    def combined() -> Any:
        total: list[torch.Tensor | None] = [None] * len(params)
        out = None
        for bits, config in configs:
            state.activate(bits, config)
            out = closure()  # zero_grad + backward for this bit
            eta = 1.0 if state.alrs == "off" else alrs_factor(bits, state.bits[0])
            for i, g in enumerate(_grad_snapshot(params)):
                if g is None:
                    continue
                if id(params[i]) in scale_ids:
                    g = g * eta
                prev = total[i]
                total[i] = g if prev is None else prev + g
        for p, g in zip(params, total, strict=True):
            p.grad = g
        return out

    return combined
