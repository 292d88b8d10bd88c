"""``GradQuantConfig``: the validated, frozen settings of gradient quantization (torch-free)."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_dbq.fqt.options import GRAD_METHOD_NAMES, MAX_GRAD_BITS, MIN_GRAD_BITS, PRUNING_METHODS

__all__ = ["GradQuantConfig"]


def _known_methods() -> tuple[str, ...]:
    """The built-in names plus any registered with ``register_grad_method`` (when that module is loaded)."""
    registry = getattr(sys.modules.get("lightning_dbq.fqt.grad_quant"), "GRAD_METHODS", {})
    return tuple(dict.fromkeys((*GRAD_METHOD_NAMES, *registry)))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GradQuantConfig:
    """How the output gradient ``gY`` of every quantized Conv/Linear layer is quantized in the backward pass.

    Args:
        bits: bits of the stochastic-rounding group quantizer, ``1``–``16`` (``2**bits - 1`` bins per group).
        method: ``"ptq"`` (one group per tensor), ``"psq"`` (per-sample groups for the input gradient,
            per-channel groups for the weight gradient), ``"bhq"`` (block Householder transform, then per-sample
            groups, for the input gradient; per-channel for the weight gradient), ``"agp"`` (``psq`` plus unbiased
            Bernoulli group pruning, ``p ∝`` group range, ``1/p`` rescale) or ``"topk"`` (the 1-bit-FQT public
            code's biased variant: keep the top ``keep`` fraction of groups by ``max|g|``, no rescale).
        keep: expected fraction of groups kept, in ``(0, 1]``; below 1 only for ``agp`` / ``topk``.
            ``bits=4, keep=0.25`` costs one bit per element on average.
        scq: sample–channel joint quantization: the weight gradient gets its own per-channel quantization (and
            pruning) of ``gY``. ``False``: both gradients use the one per-sample quantized copy.
        seed: seeds the per-layer generators of the rounding noise and pruning masks (never the global RNG).

    Raises:
        ValueError: naming the field, the value and the allowed values.
    """

    bits: int = 8
    method: str = "psq"
    keep: float = 1.0
    scq: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not MIN_GRAD_BITS <= self.bits <= MAX_GRAD_BITS:
            raise ValueError(
                f"GradQuantConfig.bits: got {self.bits!r}; allowed: an integer in [{MIN_GRAD_BITS}, {MAX_GRAD_BITS}]"
            )
        if self.method not in _known_methods():
            raise ValueError(f"GradQuantConfig.method: got {self.method!r}; allowed: {list(_known_methods())}")
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 < keep <= 1:
            raise ValueError(f"GradQuantConfig.keep: got {keep!r}; allowed: a number in (0, 1]")
        object.__setattr__(self, "keep", float(keep))
        if self.keep < 1 and self.method in GRAD_METHOD_NAMES and self.method not in PRUNING_METHODS:
            raise ValueError(
                f"GradQuantConfig.keep: got {self.keep} with method={self.method!r}; keep < 1 needs a pruning "
                f"method {list(PRUNING_METHODS)} (the other methods keep every group: use keep=1.0)"
            )
        if not isinstance(self.scq, bool):
            raise ValueError(f"GradQuantConfig.scq: got {self.scq!r}; allowed: true or false")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"GradQuantConfig.seed: got {self.seed!r}; allowed: an integer >= 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GradQuantConfig:
        """Build from a plain mapping (e.g. a Hydra ``quant.grad`` node without ``enabled``).

        Raises:
            ValueError: an unknown key (naming the allowed ones) or an invalid value.
        """
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"GradQuantConfig: unknown key(s) {unknown}; allowed: {fields}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for hyper-parameters and checkpoints)."""
        return dataclasses.asdict(self)
