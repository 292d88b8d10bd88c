"""Fake-quant kernel back-ends, chosen per model at run time (:func:`lightning_dbq.quant.prepare.set_kernel`).

* ``"fused"`` (default): one ``torch.autograd.Function`` per quantizer (:mod:`lightning_dbq.quant.fused`).
* ``"eager"``: the composite reference functions of :mod:`lightning_dbq.quant.functional`.
* ``"compile"``: ``torch.compile(dynamic=True)`` of the composite functions (Inductor: needs a C++ compiler on
  CPU, Triton on GPU; the first steps pay a one-off compile of ~30 s). Weights are passed flattened, because
  dynamo keeps the shapes of ``nn.Parameter`` inputs static and would otherwise recompile for every layer shape
  until its recompile limit.

All three give the same forward values bit for bit; gradients agree up to float32 summation order. The floor
nesting baseline (``weight_mode="floor"``) and binary weights and activations (``weight_mode="binary"``) always run
eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from lightning_dbq.quant.functional import double_round_fake, lsq_fake
from lightning_dbq.quant.fused import fused_double_round_fake, fused_lsq_fake

__all__ = ["KERNELS", "Kernels", "check_kernel", "kernels"]

from lightning_dbq.options import KERNELS  # noqa: E402


class Kernels(NamedTuple):
    """The two fake-quant functions of one back-end (signatures of ``lsq_fake`` and ``double_round_fake``)."""

    lsq: Callable[..., Tensor]
    double_round: Callable[..., Tensor]


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if it names a back-end, else raise ``ValueError`` listing the allowed values."""
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _flattened(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Call ``fn(x, scale, ...)`` on ``x`` flattened to ``(numel,)`` (scalar scale) or ``(C, numel / C)`` (per-channel
    scale), so one dynamic-shape graph serves every layer, parameters included."""

    def call(x: Tensor, scale: Tensor, *args: object) -> Tensor:
        if scale.numel() == 1:
            return fn(x.reshape(-1), scale, *args).view_as(x)
        return fn(x.reshape(x.shape[0], -1), scale.reshape(-1, 1), *args).view_as(x)

    return call


@functools.cache
def _compiled() -> Kernels:
    import torch

    act = torch.compile(lsq_fake, dynamic=True)
    weight = torch.compile(double_round_fake, dynamic=True)
    return Kernels(_flattened(act), _flattened(weight))


_STATIC = {"fused": Kernels(fused_lsq_fake, fused_double_round_fake), "eager": Kernels(lsq_fake, double_round_fake)}


def kernels(kernel: str) -> Kernels:
    """The functions of back-end ``kernel`` (``"compile"`` builds its compiled functions on first use)."""
    found = _STATIC.get(kernel)
    if found is not None:
        return found
    check_kernel(kernel)
    return _compiled()
