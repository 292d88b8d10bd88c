"""BitLoopState: what the per-bit loop needs, attached to the LightningModule as ``dbq_state``.

Kept as plain Python (no tensors that need syncing); mutable schedule state that must survive a resume lives in
callbacks' ``state_dict`` (docs/design.md §2.6).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_dbq.quant.prepare import set_bits

__all__ = ["ALGORITHMS", "NONFINITE", "BitConfig", "BitLoopState", "bit_label", "get_state"]

from lightning_dbq.options import ALGORITHMS, NONFINITE  # noqa: E402

BitConfig = int | Mapping[str, int]
# (global_step, bit_index, bits) -> per-layer config (HASB) or the uniform int
ConfigSampler = Callable[[int, int, int], BitConfig]


def bit_label(bits: int) -> str:
    """Metric suffix for a uniform configuration, e.g. ``w4a4``."""
    return f"w{bits}a{bits}"


@dataclass
class BitLoopState:
    """Configuration and transient state of the per-bit training loop.

    Attributes:
        model: the prepared (bit-switchable) model inside the LightningModule.
        bits: candidate bits, descending; the loop visits them in this order every batch.
        algorithm: ``"A2"`` (step after every bit, default) or ``"A1"`` (accumulate all bits, one step).
        alrs: ``"paper"`` (η_b), ``"eq6"`` or ``"off"``.
        alrs_act_scales: also apply η_b to the per-bit activation scales.
        kd: progressive in-place distillation (each bit learns from the next-higher bit's detached logits).
        sampler: optional per-layer config sampler (HASB); when set, pass ``i`` trains ``sampler(step, i, bits[i])``.
        active_label: label of the configuration being trained (for logging), set by the loop.
        teacher_logits: detached logits of the previous bit in this batch (KD), set by the training step.
        losses: the detached loss of each configuration label in the current batch, set by the loop.
        nonfinite: a NaN/inf loss ``"stop"``s training with an error naming the bit, or ``"skip"``s that bit's
            step (counted in ``skipped_steps``).
        max_loss: a finite loss above this also counts as diverged (``None``: only NaN/inf).
    """

    model: nn.Module
    bits: tuple[int, ...]
    algorithm: str = "A2"
    alrs: str = "paper"
    alrs_act_scales: bool = False
    kd: bool = False
    sampler: ConfigSampler | None = None
    active_label: str = ""
    active_bits: int = 0
    teacher_logits: Tensor | None = None
    backward_calls: int = 0
    checked: bool = False
    losses: dict[str, Tensor] = field(default_factory=dict)
    nonfinite: str = "stop"
    max_loss: float | None = None
    skipped_steps: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        from lightning_dbq.training.alrs import ALRS_MODES

        if self.alrs not in ALRS_MODES:
            raise ValueError(f"alrs must be one of {ALRS_MODES}, got {self.alrs!r}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        self.bits = tuple(sorted(self.bits, reverse=True))
        self.active_bits = self.bits[0]

    def configs(self, global_step: int) -> list[tuple[int, BitConfig]]:
        """The (bits, config) pairs to train for this batch, highest bit first."""
        if self.sampler is None:
            return [(b, b) for b in self.bits]
        return [(b, self.sampler(global_step, i, b)) for i, b in enumerate(self.bits)]

    def activate(self, bits: int, config: BitConfig) -> None:
        """Switch the model to ``config`` and record the label."""
        set_bits(self.model, config)
        self.active_bits = bits
        self.active_label = bit_label(bits)

    def reset(self) -> None:
        """Back to the highest bit everywhere (evaluation default)."""
        self.activate(self.bits[0], self.bits[0])
        self.teacher_logits = None


def get_state(module: Any) -> BitLoopState:
    """The :class:`BitLoopState` of a LightningModule.

    Raises:
        RuntimeError: the module was not set up for bit switching.
    """
    state = getattr(module, "dbq_state", None)
    if not isinstance(state, BitLoopState):
        raise RuntimeError(
            f"{type(module).__name__} has no bit-switch state: use lightning_dbq.training.DBQModule or add the "
            "DoubleRoundingQAT callback"
        )
    return state
