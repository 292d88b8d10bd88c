"""HASB: Hessian-aware stochastic bit-switching (paper Algorithm 1), pure torch/numpy.

* A layer is *sensitive* when its trace is at least a threshold ``tau``: the mean of all traces (``mode="mean"``)
  or the mean of the ``top_k`` largest (``mode="topk"``, the rebuttal variant). The comparison is exact (rational
  arithmetic), so ties, including all-equal traces, are sensitive.
* Insensitive layers draw their bits uniformly from the candidates ``B``; sensitive ones with ``p_i = b_i / sum(B)``
  (the "roulette": higher bits are more likely).
* At every step each layer re-draws with probability ``sigma_e = sigma_0 * (e + 1) / E`` (recomputed from
  ``sigma_0`` every epoch, never compounded), otherwise it keeps its current bits.
* Draws come from a CPU ``torch.Generator`` seeded from ``(seed, global_step, bit_index)`` through
  ``numpy.random.SeedSequence``: every DDP rank and every resume draws the same configuration, with no broadcast
  and whatever the global RNG state (data-loader workers, dropout) is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = [
    "HASBSampler",
    "bit_probabilities",
    "sensitive_layers",
    "sensitivity_threshold",
    "step_generator",
    "switch_probability",
]

_MODES = ("mean", "topk")


def _check_traces(traces: Sequence[float]) -> list[float]:
    values = [float(t) for t in traces]
    if not values:
        raise ValueError("`traces` is empty: pass one sensitivity value per layer.")
    bad = [i for i, t in enumerate(values) if not math.isfinite(t)]
    if bad:
        raise ValueError(f"`traces` must be finite, got non-finite values at indices {bad}.")
    return values


def _threshold(values: list[float], mode: str, top_k: int | None) -> Fraction:
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    if mode == "mean":
        if top_k is not None:
            raise ValueError(f"`top_k` is only used with mode='topk'; got top_k={top_k!r} with mode='mean'.")
        chosen = values
    else:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(values):
            raise ValueError(f"`top_k` must be an int in [1, {len(values)}] (number of layers), got {top_k!r}.")
        chosen = sorted(values, reverse=True)[:top_k]
    return sum((Fraction(t) for t in chosen), Fraction(0)) / len(chosen)


def sensitivity_threshold(traces: Sequence[float], mode: str = "mean", top_k: int | None = None) -> float:
    """Threshold ``tau`` of :func:`sensitive_layers` (rounded to float; the comparison itself is exact).

    Args:
        traces: one sensitivity per layer (normalized traces by default).
        mode: ``"mean"`` (mean of all traces) or ``"topk"`` (mean of the ``top_k`` largest).
        top_k: number of largest traces averaged in ``"topk"`` mode, ``1 <= top_k <= len(traces)``.

    Returns:
        The threshold.

    Raises:
        ValueError: on empty or non-finite traces, an unknown ``mode`` or a bad ``top_k``.
    """
    return float(_threshold(_check_traces(traces), mode, top_k))


def sensitive_layers(traces: Sequence[float], mode: str = "mean", top_k: int | None = None) -> list[bool]:
    """Flag the layers whose trace is ``>= tau`` (see :func:`sensitivity_threshold`).

    Args:
        traces: one sensitivity per layer (normalized traces by default).
        mode: ``"mean"`` or ``"topk"``.
        top_k: required with ``"topk"``, ``1 <= top_k <= len(traces)``; must be ``None`` with ``"mean"``.

    Returns:
        One flag per layer, in order.

    Raises:
        ValueError: on empty or non-finite traces, an unknown ``mode`` or a bad ``top_k``.

    Example:
        >>> sensitive_layers([5, 0.1, 0.2, 3, 0.05, 0.3, 0.02, 0.01])
        [True, False, False, True, False, False, False, False]
    """
    values = _check_traces(traces)
    tau = _threshold(values, mode, top_k)
    return [Fraction(t) >= tau for t in values]


def switch_probability(sigma0: float, epoch: int, max_epochs: int) -> float:
    """Linear ramp ``sigma_e = sigma0 * (epoch + 1) / max_epochs`` (recomputed from ``sigma0``, never compounded).

    Args:
        sigma0: final switching probability, in ``[0, 1]``.
        epoch: current epoch, ``0 <= epoch < max_epochs``.
        max_epochs: number of epochs ``E >= 1``.

    Returns:
        The switching probability of ``epoch``.

    Raises:
        ValueError: when an argument is out of its range.
    """
    if not (isinstance(max_epochs, int) and max_epochs >= 1):
        raise ValueError(f"`max_epochs` must be an int >= 1, got {max_epochs!r}.")
    if not (isinstance(epoch, int) and 0 <= epoch < max_epochs):
        raise ValueError(f"`epoch` must be an int in [0, {max_epochs - 1}] (max_epochs={max_epochs}), got {epoch!r}.")
    if not (isinstance(sigma0, (int, float)) and 0.0 <= sigma0 <= 1.0):
        raise ValueError(f"`sigma0` must be a float in [0, 1], got {sigma0!r}.")
    return float(sigma0) * (epoch + 1) / max_epochs


def _check_bits(bits: Sequence[int]) -> list[int]:
    values = list(bits)
    if not values or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in values):
        raise ValueError(f"`bits` must be a non-empty sequence of ints >= 1, got {values!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"`bits` must not contain duplicates, got {values!r}.")
    return values


def bit_probabilities(bits: Sequence[int], sensitive: bool) -> list[float]:
    """Sampling distribution over the candidate ``bits`` of one layer.

    Args:
        bits: candidate bit-widths (distinct positive ints), e.g. ``[8, 6, 4, 2]``.
        sensitive: ``True`` -> roulette ``p_i = b_i / sum(bits)``; ``False`` -> uniform ``1 / len(bits)``.

    Returns:
        Probabilities aligned with ``bits``.

    Raises:
        ValueError: on empty, non-positive or duplicate ``bits``.

    Example:
        >>> bit_probabilities([8, 6, 4, 2], sensitive=True)
        [0.4, 0.3, 0.2, 0.1]
    """
    values = _check_bits(bits)
    if sensitive:
        total = sum(values)
        return [b / total for b in values]
    return [1.0 / len(values)] * len(values)


def step_generator(seed: int, global_step: int, bit_index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, global_step, bit_index)`` via ``numpy.random.SeedSequence``.

    It depends on nothing else (no global RNG), so all DDP ranks and every resume get the same stream.

    Args:
        seed: experiment seed, ``>= 0``.
        global_step: optimizer step, ``>= 0``.
        bit_index: index of the sub-step within the per-bit loop, ``>= 0``.

    Returns:
        A fresh ``torch.Generator`` on the CPU.

    Raises:
        ValueError: when an argument is not a non-negative int.
    """
    for name, value in (("seed", seed), ("global_step", global_step), ("bit_index", bit_index)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")
    state = np.random.SeedSequence([int(seed), int(global_step), int(bit_index)]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1))
    return gen


class HASBSampler:
    """Per-layer stochastic bit switching with Hessian-aware roulette probabilities.

    Args:
        layers: layer names, in a fixed order (the order of the draws).
        bits: candidate bit-widths (distinct positive ints).
        sensitive: one flag per layer (e.g. from :func:`sensitive_layers`); ``None`` -> uniform baseline.
        seed: experiment seed (``>= 0``) of :func:`step_generator`.
        uniform: ``True`` -> every layer samples uniformly (the uniform-sampling baseline).

    Raises:
        ValueError: on empty or duplicate layers, bad bits, or a ``sensitive`` of the wrong length.

    Example:
        >>> sampler = HASBSampler(["a", "b"], [8, 4], [True, False], seed=1)
        >>> new = sampler.sample({"a": 8, "b": 8}, global_step=0, bit_index=0, sigma=1.0)
        >>> sorted(new) == ["a", "b"] and set(new.values()) <= {8, 4}
        True
    """

    def __init__(
        self,
        layers: Sequence[str],
        bits: Sequence[int],
        sensitive: Sequence[bool] | None,
        *,
        seed: int = 0,
        uniform: bool = False,
    ) -> None:
        self._configure(layers, bits, sensitive, seed, uniform)

    def _configure(
        self, layers: Sequence[str], bits: Sequence[int], sensitive: Sequence[bool] | None, seed: int, uniform: bool
    ) -> None:
        names = [str(name) for name in layers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"`layers` must be a non-empty sequence of distinct names, got {names!r}.")
        candidates = _check_bits(bits)
        flags = None if sensitive is None else [bool(s) for s in sensitive]
        if flags is not None and len(flags) != len(names):
            raise ValueError(f"`sensitive` must have one flag per layer ({len(names)}), got {len(flags)} flags.")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {seed!r}.")
        self.layers, self.bits, self.sensitive = names, candidates, flags
        self.seed, self.uniform = seed, bool(uniform)
        rows = [bit_probabilities(candidates, self.is_sensitive(name)) for name in names]
        self._probs = torch.tensor(rows, dtype=torch.float64)

    def is_sensitive(self, layer: str) -> bool:
        """Whether ``layer`` uses the roulette distribution (always ``False`` for the uniform baseline)."""
        if layer not in self.layers:
            raise ValueError(f"`layer` must be one of {self.layers}, got {layer!r}.")
        if self.uniform or self.sensitive is None:
            return False
        return self.sensitive[self.layers.index(layer)]

    def probabilities(self) -> dict[str, list[float]]:
        """``{layer: probabilities aligned with bits}``."""
        return {name: row.tolist() for name, row in zip(self.layers, self._probs, strict=True)}

    def sample(self, current: Mapping[str, int], global_step: int, bit_index: int, sigma: float) -> dict[str, int]:
        """Draw the next configuration.

        Each layer re-draws from its distribution with probability ``sigma`` and otherwise keeps ``current``. The
        switch mask (``torch.rand``) and one candidate per layer (``torch.multinomial``) are always drawn, so the
        stream does not depend on ``sigma`` or ``current``.

        Args:
            current: current bits of every layer (extra keys are ignored).
            global_step: optimizer step (``>= 0``).
            bit_index: sub-step index within the per-bit loop (``>= 0``).
            sigma: switching probability in ``[0, 1]`` (see :func:`switch_probability`).

        Returns:
            ``{layer: bits}`` for every layer.

        Raises:
            ValueError: on a missing layer in ``current``, or ``sigma`` / step arguments out of range.
        """
        if not (isinstance(sigma, (int, float)) and 0.0 <= sigma <= 1.0):
            raise ValueError(f"`sigma` must be a float in [0, 1], got {sigma!r}.")
        missing = [name for name in self.layers if name not in current]
        if missing:
            raise ValueError(f"`current` lacks bits for layers {missing}; it must cover all of {self.layers}.")
        gen = step_generator(self.seed, global_step, bit_index)
        switch = torch.rand(len(self.layers), generator=gen, dtype=torch.float64) < sigma
        draws = torch.multinomial(self._probs, 1, generator=gen).squeeze(1)
        return {
            name: self.bits[int(idx)] if bool(flip) else int(current[name])
            for name, flip, idx in zip(self.layers, switch, draws, strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python configuration (layers, bits, sensitive, seed, uniform)."""
        return {
            "layers": list(self.layers),
            "bits": list(self.bits),
            "sensitive": None if self.sensitive is None else list(self.sensitive),
            "seed": self.seed,
            "uniform": self.uniform,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the configuration saved by :meth:`state_dict`.

        Raises:
            ValueError: when a key is missing or a value is invalid.
        """
        keys = ("layers", "bits", "sensitive", "seed", "uniform")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"`state` lacks keys {missing}; expected keys {list(keys)}.")
        self._configure(state["layers"], state["bits"], state["sensitive"], state["seed"], state["uniform"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> HASBSampler:
        """Build a sampler from :meth:`state_dict` output."""
        sampler = cls.__new__(cls)
        sampler.load_state_dict(state)
        return sampler

    def __repr__(self) -> str:
        n_sens = sum(self.is_sensitive(name) for name in self.layers)
        return (
            f"HASBSampler(layers={len(self.layers)}, bits={self.bits}, sensitive={n_sens}, "
            f"seed={self.seed}, uniform={self.uniform})"
        )
