"""Fake-quant kernel back-ends, chosen per model at run time (:func:`lightning_dbq.quant.prepare.set_kernel`).

* ``"fused"``: one ``torch.autograd.Function`` per quantizer (:mod:`lightning_dbq.quant.fused`).
* ``"eager"``: the composite reference functions of :mod:`lightning_dbq.quant.functional`.
* ``"compile"``: ``torch.compile(dynamic=True)`` of the composite functions (Inductor: needs a C++ compiler on
  CPU, Triton on GPU; the first steps pay a one-off compile of ~30 s). Weights are passed flattened, because
  dynamo keeps the shapes of ``nn.Parameter`` inputs static and would otherwise recompile for every layer shape
  until its recompile limit.
* ``"auto"`` (default): ``"compile"`` where it works on the input's device type, else ``"fused"``. Decided once per
  device type by compiling and running a tiny probe the first time an ``"auto"`` quantizer runs eagerly (a choice
  made inside a ``torch.compile`` trace uses ``"fused"`` and is not cached); the choice and its reason are logged
  at INFO (:func:`auto_choice` returns them). The environment variable ``DBQ_KERNEL_AUTO`` (``fused``, ``eager``
  or ``compile``) replaces the probe, e.g. to keep a test suite's time independent of the machine's compiler.

All three give the same forward values bit for bit; gradients agree up to float32 summation order. The floor
nesting baseline (``weight_mode="floor"``) and binary weights and activations (``weight_mode="binary"``) always run
eagerly.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_dbq.quant.functional import double_round_fake, double_round_grads, lsq_fake, lsq_grads
from lightning_dbq.quant.fused import double_round_window, fused_double_round_fake, fused_lsq_fake, lsq_window
from lightning_dbq.quant.recompute import FakeQuantOp

__all__ = ["AUTO_ENV", "DEFAULT_KERNEL", "KERNELS", "Kernels", "auto_choice", "check_kernel", "kernels"]

log = logging.getLogger(__name__)

from lightning_dbq.options import DEFAULT_KERNEL, KERNELS  # noqa: E402

AUTO_ENV = "DBQ_KERNEL_AUTO"


class Kernels(NamedTuple):
    """The two fake-quant functions of one back-end (signatures of ``lsq_fake`` and ``double_round_fake``).

    ``closed_form``: a quantized convolution rebuilds its operands and their gradients in closed form in its
    backward (:mod:`lightning_dbq.quant.recompute`): with ``lsq_grads`` / ``double_round_grads`` (the back-end's own
    gradient functions, signatures of :func:`~lightning_dbq.quant.functional.lsq_grads` and
    :func:`~lightning_dbq.quant.functional.double_round_grads`: the compiled ones) after rebuilding the operand with
    the back-end's forward, else with :func:`~lightning_dbq.quant.fused.rebuild` /
    :func:`~lightning_dbq.quant.fused.operand_grads_` (the fused kernel). ``False``: it re-runs the back-end's own
    function with its graph and differentiates it (the eager reference).
    """

    lsq: Callable[..., Tensor]
    double_round: Callable[..., Tensor]
    closed_form: bool = True
    lsq_grads: Callable[..., tuple[Tensor, Tensor]] | None = None
    double_round_grads: Callable[..., tuple[Tensor, Tensor]] | None = None

    def lsq_op(self, bits: int, signed: bool, g: float) -> FakeQuantOp:
        """``lsq(x, s, bits, signed, g)`` as a :class:`~lightning_dbq.quant.recompute.FakeQuantOp`."""
        window = lsq_window(bits, signed, g) if self.closed_form else None
        return FakeQuantOp(self.lsq, (bits, signed, g), window, self.lsq_grads)

    def double_round_op(self, high_bits: int, bits: int, g: float) -> FakeQuantOp:
        """``double_round(w, s, high_bits, bits, g)`` as a :class:`~lightning_dbq.quant.recompute.FakeQuantOp`."""
        window = double_round_window(high_bits, bits, g) if self.closed_form else None
        return FakeQuantOp(self.double_round, (high_bits, bits, g), window, self.double_round_grads)


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if it names a back-end, else raise ``ValueError`` listing the allowed values."""
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _flat(x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` as ``(numel,)`` with a scalar scale, or as ``(C, numel / C)`` with the per-channel scale as ``(C, 1)``."""
    if scale.numel() == 1:
        return x.reshape(-1), scale
    return x.reshape(x.shape[0], -1), scale.reshape(-1, 1)


def _flattened(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Call ``fn(x, scale, ...)`` on ``x`` and ``scale`` flattened by :func:`_flat`, so one dynamic-shape graph serves
    every layer, parameters included. Without grad mode the inputs go in detached: dynamo guards on
    ``requires_grad``, and this way one inference graph serves a parameter, an activation and
    :mod:`~lightning_dbq.quant.recompute`'s forward alike (same values)."""

    def call(x: Tensor, scale: Tensor, *args: object) -> Tensor:
        if not torch.is_grad_enabled():
            x, scale = x.detach(), scale.detach()
        return fn(*_flat(x, scale), *args).view_as(x)

    return call


def _flattened_grads(fn: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    """Call ``fn(grad, x, scale, ...)`` (:func:`~lightning_dbq.quant.functional.lsq_grads` or
    :func:`~lightning_dbq.quant.functional.double_round_grads`) on ``grad``, ``x`` and ``scale`` flattened by
    :func:`_flat`, and return the gradients in the shapes of ``x`` and ``scale``."""

    def call(grad: Tensor, x: Tensor, scale: Tensor, *args: object) -> tuple[Tensor, Tensor]:
        flat_x, flat_s = _flat(x, scale)
        gx, gs = fn(grad.reshape(flat_x.shape), flat_x, flat_s, *args)
        return gx.view_as(x), gs.reshape(scale.shape)

    return call


@functools.cache
def _compiled() -> Kernels:
    import torch

    act = torch.compile(lsq_fake, dynamic=True)
    weight = torch.compile(double_round_fake, dynamic=True)
    # a quantized convolution's backward rebuilds its operand with the forward's (inference) graph and takes the
    # gradients from one compiled no-grad graph: no autograd graph to build and walk per operand (docs/performance.md)
    act_grads = torch.compile(lsq_grads, dynamic=True)
    weight_grads = torch.compile(double_round_grads, dynamic=True)
    return Kernels(
        _flattened(act), _flattened(weight), True, _flattened_grads(act_grads), _flattened_grads(weight_grads)
    )


_STATIC = {
    "fused": Kernels(fused_lsq_fake, fused_double_round_fake),
    "eager": Kernels(lsq_fake, double_round_fake, closed_form=False),
}


_AUTO: dict[str, tuple[str, str]] = {}


def _probe_compile(device_type: str) -> tuple[str, str]:
    """``("compile", reason)`` when a tiny compiled fake-quant builds, runs and matches eager on ``device_type``,
    else ``("fused", reason)``."""
    try:
        x = torch.linspace(-2.0, 2.0, 64, device=device_type)
        s = torch.tensor(0.05, device=device_type)
        got = torch.compile(lsq_fake, dynamic=True)(x, s, 4, True, 1.0)
        if not torch.equal(got, lsq_fake(x, s, 4, True, 1.0)):
            return "fused", f"a compiled probe on {device_type} disagreed with eager"
    except Exception as err:  # noqa: BLE001  any failure (no C++ compiler, no Triton, ...) means: do not compile
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return "fused", f"torch.compile does not work on {device_type}: {type(err).__name__}: {first[:200]}"
    backend = "Triton" if device_type == "cuda" else "a C++ toolchain" if device_type == "cpu" else "Inductor"
    return "compile", f"torch.compile built and ran a probe on {device_type} ({backend} works)"


def _auto_from_env() -> tuple[str, str] | None:
    """``(back-end, reason)`` from ``DBQ_KERNEL_AUTO`` if set (non-empty), else ``None``."""
    value = os.environ.get(AUTO_ENV, "")
    if not value:
        return None
    if value not in ("fused", "eager", "compile"):
        raise ValueError(f"{AUTO_ENV}: got {value!r}; allowed: 'fused', 'eager', 'compile' (or unset: probe)")
    return value, f"{AUTO_ENV}={value} in the environment"


def auto_choice(device_type: str = "cpu") -> tuple[str, str]:
    """The back-end ``"auto"`` uses on ``device_type`` and why (probed, or read from ``DBQ_KERNEL_AUTO``, and logged
    once per device type)."""
    if device_type not in _AUTO:
        _AUTO[device_type] = _auto_from_env() or _probe_compile(device_type)
        log.info("kernel='auto' on %s: %s (%s)", device_type, *_AUTO[device_type])
    return _AUTO[device_type]


def kernels(kernel: str, device_type: str = "cpu") -> Kernels:
    """The functions of back-end ``kernel`` (``"compile"`` builds its compiled functions on first use; ``"auto"``
    resolves for ``device_type``, see the module docstring)."""
    found = _STATIC.get(kernel)
    if found is not None:
        return found
    check_kernel(kernel)
    if kernel == "auto":
        chosen = _AUTO.get(device_type)
        if chosen is None:
            if torch.compiler.is_compiling():  # never probe inside someone's trace
                return _STATIC["fused"]
            chosen = auto_choice(device_type)
        if chosen[0] != "compile":
            return _STATIC[chosen[0]]
    return _compiled()
