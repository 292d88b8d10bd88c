"""Weight quantizer modules (thin shells around :mod:`lightning_dbq.quant.functional`).

* :class:`WeightQuantizer` — the base of the weight quantizers, one subclass per ``weight_mode`` registered in
  :mod:`lightning_dbq.quant.registry`: :class:`DoubleRoundWeightQuantizer` (the method: ONE learned scale ``s_h``
  per layer — per-tensor by default, per-output-channel as an option — shared by every candidate bit; only the
  ``h``-bit codes are ever stored), and the baselines :class:`FloorWeightQuantizer` (floor nesting from the same
  shared scale) and :class:`UnsharedWeightQuantizer` (one LSQ scale per bit, FP32 storage). The binary mode lives
  in :mod:`lightning_dbq.quant.binary`. ``WeightQuantizer(weight, bits, mode=...)`` builds the registered class.
* :class:`ActQuantizer` (defined in :mod:`lightning_dbq.quant.act_quantizers`, re-exported here) — LSQ with one
  learned scale per candidate bit.

Scales are positive by construction: the module stores a raw parameter ``p`` and uses ``|p| + eps``, so no
optimizer step, however large, can make a scale zero or negative.

The shared weight scale is stored *relative to its initial value*: ``s_h = s_ref · (|p| + eps)`` with the buffer
``s_ref`` fixed at initialisation and ``p`` starting at 1, and the gradient reaching ``p`` is ``∂L/∂s_h / s_ref``
(not the chain-rule ``s_ref · ∂L/∂s_h``). Two consequences, both intended:

* plain SGD moves ``s_h`` exactly as before (``Δs_h = s_ref·Δp = −lr·∂L/∂s_h``: LSQ's own dynamics, with its
  gradient scale ``g``);
* Adam-type optimizers, whose step is ≈ ``lr`` *in parameter units* whatever the gradient's size, now move
  ``s_h`` by ≈ ``lr·s_ref`` — a relative step. Stored as a raw value, ``s_h`` (~1e-3: the lowest bit's scale
  divided by ``2^(h−l_min)``) moved by a whole ``lr`` (1e-3 … 1e-2) per step, i.e. by more than itself: it crossed
  zero, was reflected by ``|p|`` and wandered over ``[0, ~lr]``. At 8 bits that is harmless; at 2 bits the step is
  ``2^6·s_h`` and a scale a few times too large rounds every 2-bit code to zero, which collapsed 2-bit training
  to chance on some seeds (docs/math.md §2.4).

State dicts from before this change (no ``scale_ref``) load exactly: ``s_ref = |p_old| + eps`` and ``p = 1``.

Inference weight cache: in eval mode under ``torch.no_grad()`` / ``torch.inference_mode()``, a
:class:`WeightQuantizer` keeps the fake-quantized weight of each bit it has run at (see
:meth:`WeightQuantizer.forward`), so serving a fixed model does not re-quantize every weight on every batch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_dbq.quant.act_quantizers import SCALE_EPS, ActQuantizer, _positive
from lightning_dbq.quant.functional import (
    MAX_BITS,
    MIN_BITS,
    decode_weight,
    double_round_codes,
    double_round_fake,
    floor_nest_fake,
    lsq_grad_scale,
    qrange,
    rhu_interval,
    shift_codes,
)
from lightning_dbq.quant.kernels import check_kernel, kernels
from lightning_dbq.quant.packing import pack_width
from lightning_dbq.quant.recompute import FakeQuantOp
from lightning_dbq.quant.registry import register_weight_quantizer, weight_quantizer_class

__all__ = [
    "SCALE_EPS",
    "ActQuantizer",
    "DoubleRoundWeightQuantizer",
    "FloorWeightQuantizer",
    "UnsharedWeightQuantizer",
    "WeightQuantizer",
    "relative_scale",
]


def relative_scale(p: Tensor, ref: Tensor) -> Tensor:
    """``s = ref · (|p| + eps)`` whose gradient with respect to ``p`` is ``sign(p) · ∂L/∂s / ref``.

    The forward value is exactly ``ref · (|p| + eps)`` (the straight-through term adds an exact zero); see the
    module docstring for why the gradient is divided by ``ref`` instead of multiplied.
    """
    a = _positive(p)
    frozen = a.detach()
    return ref * frozen + (a - frozen) / ref


class WeightQuantizer(nn.Module):
    """Base of the weight quantizers: one subclass per ``weight_mode`` (:mod:`lightning_dbq.quant.registry`).

    ``WeightQuantizer(weight, bits, mode="floor")`` builds the class registered as ``mode`` (default
    ``"double_round"``); a subclass can also be built directly. What a mode owns (class attributes and methods):

    * :attr:`has_codes`: whether its weights are stored as shared integer codes (``False``: FP32 storage);
    * :meth:`codes` / :meth:`decode`: the stored ``h``-bit codes of a weight and the weight ``load_int`` rebuilds
      from (possibly narrower) codes; :meth:`storage_bits`: the packed width per weight;
    * :meth:`nest_codes` / :meth:`candidate_codes` / :meth:`fake_weight`: how lower bits derive from stored codes
      (slim artifacts, :mod:`lightning_dbq.quant.slim`);
    * :attr:`act_quantizer`: the activation quantizer class that goes with it; :meth:`check_bits`: the bit lists it
      accepts; :attr:`subnet_search`: whether mixed-precision SubNet search applies;
    * :meth:`effective_scale`: the scale ``s`` with ``weight grid = codes · s`` (what freeze and export record);
    * :meth:`_op`: its training-mode fake quantizer as a pure op and a scale (or its own :meth:`_fake_quant`), which
      :meth:`fake_quant_op` hands to :mod:`lightning_dbq.quant.recompute`.

    Eval-mode cache: with ``self.training`` False and gradients off (``torch.no_grad()`` or
    ``torch.inference_mode()``), the output is cached per active bit and reused while the weight and the scale
    tensors are the same objects with the same storage (``data_ptr``) and the same ``_version`` counters (every
    in-place change bumps them: optimizer steps, ``load_state_dict``, ``with torch.no_grad(): w.add_(1)``) and
    ``kernel`` and ``mode`` are unchanged; any change drops every entry at once (a disabled quantizer bypasses the
    cache). Memory: at most one tensor of the weight's size per candidate bit per layer (``len(bits)`` extra weight
    copies when a model is evaluated at every bit), freed by ``train()`` and :meth:`clear_cache`, never saved or
    pickled. Training mode, grad-enabled forwards, ``torch.compile`` / ``torch.jit.trace`` / ``torch.export`` tracing
    and inference-tensor weights never use the cache. Not seen: writes through ``weight.data`` (which has its own
    version counter): call :meth:`clear_cache` after those.

    Args:
        weight: the layer's weight, used for the initial scale and the shape of a per-channel scale.
        bits: candidate bits (checked by :meth:`check_bits`), any order.
        per_channel: one scale per output channel (dim 0) instead of one per tensor.
        mode: the registered ``weight_mode`` to build (only when calling ``WeightQuantizer`` itself; a subclass
            accepts its own mode or ``None``).
        kernel: fake-quant back-end, ``"fused"`` | ``"eager"`` | ``"compile"`` | ``"auto"``
            (:mod:`lightning_dbq.quant.kernels`).
    """

    #: the registered name (set by :func:`~lightning_dbq.quant.registry.register_weight_quantizer`)
    mode: ClassVar[str] = ""
    #: weights stored as shared integer codes (``False``: FP32 weights in the artifact, no slim artifacts)
    has_codes: ClassVar[bool] = True
    #: the narrowest code width a stored layer may use
    min_code_bits: ClassVar[int] = MIN_BITS
    #: learning-rate floor of this mode's latent weights (``param_groups`` trains them at ``max(lr, floor)``;
    #: ``None``: no floor, the weights train at ``lr``)
    min_useful_lr: ClassVar[float | None] = None
    #: mixed-precision SubNet search (:mod:`lightning_dbq.search`) applies to this mode
    subnet_search: ClassVar[bool] = False
    #: the activation quantizer class of this mode
    act_quantizer: ClassVar[type[ActQuantizer]] = ActQuantizer

    _cache: dict[int, Tensor]
    _cache_state: tuple[Any, ...] | None
    _cache_refs: tuple[weakref.ref[Tensor], ...]

    def __new__(cls, *args: Any, **kwargs: Any) -> WeightQuantizer:
        if cls is WeightQuantizer:  # the factory form: WeightQuantizer(weight, bits, mode=...)
            mode = kwargs.get("mode", args[3] if len(args) > 3 else None)
            cls = weight_quantizer_class("double_round" if mode is None else mode)
        return super().__new__(cls)

    def __init__(
        self,
        weight: Tensor,
        bits: Sequence[int],
        per_channel: bool = False,
        mode: str | None = None,
        kernel: str = "fused",
    ) -> None:
        super().__init__()
        if mode is not None and mode != type(self).mode:
            raise ValueError(f"{type(self).__name__} is weight_mode {type(self).mode!r}, got mode={mode!r}; build "
                             "WeightQuantizer(weight, bits, mode=...) for another mode")  # fmt: skip
        self.kernel: str = check_kernel(kernel)
        self.bits: tuple[int, ...] = tuple(sorted(bits, reverse=True))
        type(self).check_bits(self.bits)
        self.high_bits: int = self.bits[0]
        self.active_bits: int = self.high_bits
        self.enabled: bool = True
        self.per_channel = per_channel
        self._cache = {}
        self._cache_state, self._cache_refs = None, ()
        self._init_state(weight.detach())

    # ------------------------------------------------------------------ what each mode defines

    @classmethod
    def check_bits(cls, bits: tuple[int, ...]) -> None:
        """Raise ``ValueError`` when this mode cannot use the (validated, descending) candidate ``bits``.

        Default: every bit in ``[MIN_BITS, MAX_BITS]`` (multi-precision modes).
        """
        bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"weight_mode={cls.mode!r} needs bits in [{MIN_BITS}, {MAX_BITS}], got {list(bits)}"
                             + ("; bits=[1] is weight_mode='binary'" if 1 in bad else ""))  # fmt: skip

    def _init_state(self, w: Tensor) -> None:
        """Register the mode's parameters and buffers from the (detached) initial weight."""
        raise NotImplementedError

    def effective_scale(self) -> Tensor:
        """The positive scale ``s`` of the stored grid (``weight = codes · s``) at the active bits."""
        raise NotImplementedError

    def scale_tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the fake-quantized weight depends on besides the weight (keys of the eval cache)."""
        raise NotImplementedError

    def _op(self, w: Tensor) -> tuple[FakeQuantOp, Tensor] | None:
        """The mode's training-mode fake quantizer as a pure op and its scale (``None``: the mode defines
        :meth:`_fake_quant` itself)."""
        return None

    def _fake_quant(self, w: Tensor) -> Tensor:
        found = self._op(w)
        if found is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither _op nor _fake_quant")
        return found[0](w, found[1])

    def fake_quant_op(self, w: Tensor) -> tuple[FakeQuantOp, Tensor] | None:
        """What the enabled training-mode forward does to ``w``: ``forward(w) == op(w, scale)``, with the op's
        arguments (bits, gradient scale, kernel) fixed at this call; ``None`` when the mode has no such op (its
        :meth:`_fake_quant` or :meth:`forward` is its own, e.g. binary weights, whose scale is a function of ``w``).
        Used by :mod:`lightning_dbq.quant.recompute`."""
        cls = type(self)
        if cls._fake_quant is not WeightQuantizer._fake_quant or cls.forward is not WeightQuantizer.forward:
            return None
        return self._op(w)

    def codes(self, w: Tensor) -> Tensor:
        """The stored ``h``-bit integer codes of ``w`` as int8.

        Raises:
            ValueError: the mode has no shared integer codes (:attr:`has_codes` is False).
        """
        raise ValueError(f"weight_mode={self.mode!r} has no shared integer codes (FP32 storage)")

    def decode(self, codes: Tensor, code_bits: int) -> Tensor:
        """The float32 weight rebuilt from stored ``code_bits``-bit ``codes``: ``c · 2^(h−w) · s`` (``load_int``), on
        the scale's device."""
        scale = self.effective_scale().detach()
        return decode_weight(codes.to(scale.device), code_bits, self.high_bits, scale)

    @classmethod
    def storage_bits(cls, code_bits: int) -> int:
        """Bits per weight in an artifact: the packing width of ``code_bits``-bit codes, or 32 without codes."""
        return pack_width(code_bits) if cls.has_codes else 32

    @classmethod
    def nest_codes(cls, q_high: Tensor, high_bits: int, bits: int) -> Tensor:
        """The ``bits``-bit codes this mode derives from ``high_bits``-bit codes (int32)."""
        raise ValueError(f"weight_mode={cls.mode!r} has no nested integer codes")

    @classmethod
    def candidate_codes(
        cls, q_high: Tensor, high_bits: int, width: int, targets: Sequence[tuple[int, Tensor]]
    ) -> Tensor:
        """Candidate ``width``-bit codes meant to reproduce ``targets`` (``(bits, codes)`` pairs) by nesting.

        Default: the mode's own ``width``-bit codes :meth:`nest_codes` (enough for a transitive nesting such as
        truncation). Slim artifacts check every candidate exactly (:func:`~lightning_dbq.quant.slim.narrowest_width`).
        """
        return cls.nest_codes(q_high, high_bits, width)

    @classmethod
    def fake_weight(cls, weight: Tensor, scale: Tensor, high_bits: int, bits: int) -> Tensor:
        """The eager reference of this mode's fake-quantized weight at ``bits`` from the stored scale (no grad)."""
        raise ValueError(f"weight_mode={cls.mode!r} has no shared scale to fake-quantize with")

    # ------------------------------------------------------------------ shared machinery

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantize ``w`` at :attr:`active_bits` (identity when disabled; cached in eval mode without grad)."""
        if not self.enabled:
            return w
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._fake_quant(w)
        found = self._cache_key(w)
        if found is None:
            return self._fake_quant(w)
        state, refs = found
        # a dead reference means the id may now belong to another tensor
        if state != self._cache_state or any(r() is None for r in self._cache_refs):
            self._cache.clear()  # weight, scale, kernel or mode changed: every bit's entry is stale
            self._cache_state, self._cache_refs = state, refs
        out = self._cache.get(self.active_bits)
        if out is None:
            out = self._cache[self.active_bits] = self._fake_quant(w)
        return out

    def _cache_key(self, w: Tensor) -> tuple[tuple[Any, ...], tuple[weakref.ref[Tensor], ...]] | None:
        """Identity, storage and version of ``w`` and of every scale tensor, plus weak references that tell
        whether those tensors are still alive (``None``: do not cache)."""
        key: list[Any] = [self.kernel, self.mode]
        refs = []
        try:
            for t in (w, *self.scale_tensors()):
                if type(t) not in (Tensor, nn.Parameter) or t.is_inference():
                    return None  # tracing/functorch wrappers, or tensors without a version counter
                key += [id(t), t.data_ptr(), t._version, t.device, t.dtype, t.shape, t.stride()]
                refs.append(weakref.ref(t))
        except RuntimeError:  # pragma: no cover - tensors without storage
            return None
        return tuple(key), tuple(refs)

    def clear_cache(self) -> None:
        """Drop the cached eval-mode weights (see the class docstring)."""
        self._cache.clear()
        self._cache_state, self._cache_refs = None, ()

    def train(self, mode: bool = True) -> WeightQuantizer:
        """Set training mode; entering training mode drops the eval-mode weight cache."""
        if mode:
            self.clear_cache()
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state["_cache"], state["_cache_state"], state["_cache_refs"] = {}, None, ()  # never pickled or copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        old_mode = state.pop("mode", None)  # pickles from before the registry: one class, mode an attribute
        super().__setstate__(state)
        if isinstance(old_mode, str):
            self.__class__ = weight_quantizer_class(old_mode)
        self.__dict__.setdefault("_cache", {})  # pickles from before the cache existed
        self.__dict__.setdefault("_cache_state", None)
        self.__dict__.setdefault("_cache_refs", ())

    def _lsq_init(self, w: Tensor, bits: int) -> Tensor:
        """``2·mean|W| / sqrt(Q_P(bits))`` (per tensor or per output channel)."""
        if self.per_channel:
            mean_abs = w.abs().float().reshape(w.shape[0], -1).mean(dim=1)
            mean_abs = mean_abs.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
        else:
            mean_abs = w.abs().float().mean()
        return (2.0 * mean_abs / math.sqrt(qrange(bits, signed=True)[1])).clamp_min(1e-6)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, active_bits={self.active_bits}, per_channel={self.per_channel}, mode={self.mode!r}, "
            f"kernel={self.kernel!r}"
        )


class _SharedScaleWeightQuantizer(WeightQuantizer):
    """One learned scale ``s_h`` shared by every bit, stored relative to its initial value; ``h``-bit codes.

    The scale is initialised for the *lowest* candidate bit so low bits are not all zeros (docs/math.md §2.3):
    ``s_h = 2·mean|W| / sqrt(Q_P(l_min)) / 2^(h − l_min)``. The LSQ gradient scale uses ``N`` = number of weights
    sharing one scale and ``Q_P(h)``.
    """

    scale_ref: Tensor

    def _init_state(self, w: Tensor) -> None:
        low = self.bits[-1]
        init = self._lsq_init(w, low) / float(1 << (self.high_bits - low))
        self.register_buffer("scale_ref", init)
        self.scale = nn.Parameter(torch.ones_like(init))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, missing_keys: list[str],
        unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        key, ref_key = prefix + "scale", prefix + "scale_ref"
        if key in state_dict and ref_key not in state_dict:
            # a state dict from before the relative parametrisation: s = |p| + eps  ->  s_ref = |p| + eps, p = 1
            old = state_dict[key]
            state_dict[ref_key] = _positive(old.detach())
            state_dict[key] = torch.ones_like(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def effective_scale(self) -> Tensor:
        """The positive shared scale ``s_h = s_ref·(|p| + eps)``."""
        return relative_scale(self.scale, self.scale_ref)

    def scale_tensors(self) -> tuple[Tensor, ...]:
        return (self.scale, self.scale_ref)

    def _grad_scale(self, w: Tensor, s: Tensor) -> float:
        return lsq_grad_scale(w.numel() // s.numel(), qrange(self.high_bits, signed=True)[1])

    def codes(self, w: Tensor) -> Tensor:
        """The stored ``h``-bit integer codes ``clamp(rhu(W / s_h))`` of ``w`` as int8."""
        q_h, _ = double_round_codes(w, self.effective_scale().detach(), self.high_bits, self.high_bits)
        return q_h.to(torch.int8)


@register_weight_quantizer("double_round")
class DoubleRoundWeightQuantizer(_SharedScaleWeightQuantizer):
    """Double Rounding weight quantizer with one shared learned scale (the method).

    .. math:: \\hat W_l = \\mathrm{clamp}(\\lfloor q_h / 2^k + 1/2 \\rfloor) \\cdot 2^k \\cdot s_h
    """

    subnet_search = True

    def _op(self, w: Tensor) -> tuple[FakeQuantOp, Tensor]:
        s = self.effective_scale()
        k = kernels(self.kernel, w.device.type)
        return k.double_round_op(self.high_bits, self.active_bits, self._grad_scale(w, s)), s

    @classmethod
    def nest_codes(cls, q_high: Tensor, high_bits: int, bits: int) -> Tensor:
        """``clamp(rhu(q_h / 2^k))`` (:func:`~lightning_dbq.quant.functional.shift_codes`)."""
        return shift_codes(q_high, high_bits, bits)

    @classmethod
    def candidate_codes(
        cls, q_high: Tensor, high_bits: int, width: int, targets: Sequence[tuple[int, Tensor]]
    ) -> Tensor:
        """The ``width``-bit Double Rounding codes, moved per weight to the nearest code inside the range of codes
        whose rounding gives the target code at every kept bit (Double Rounding is not transitive:
        ``rhu(rhu(24/16)/4) = 1`` but ``rhu(24/64) = 0``)."""
        codes = cls.nest_codes(q_high, high_bits, width)
        lo_w, hi_w = qrange(width, signed=True)
        lower = torch.full_like(codes, lo_w, dtype=torch.int64)
        upper = torch.full_like(codes, hi_w, dtype=torch.int64)
        for b, want in targets:
            lo, hi = rhu_interval(want, width - b, b, width)
            lower, upper = torch.maximum(lower, lo), torch.minimum(upper, hi)
        return torch.minimum(torch.maximum(codes.to(torch.int64), lower), upper).to(torch.int32)

    @classmethod
    def fake_weight(cls, weight: Tensor, scale: Tensor, high_bits: int, bits: int) -> Tensor:
        with torch.no_grad():
            return double_round_fake(weight, scale, high_bits, bits)


@register_weight_quantizer("floor")
class FloorWeightQuantizer(_SharedScaleWeightQuantizer):
    """Floor nesting baseline (AdaBits-style): ``q_l = q_h >> k`` from the same shared scale and ``h``-bit codes.

    Always runs eagerly (:func:`~lightning_dbq.quant.functional.floor_nest_fake`, whatever the ``kernel``).
    """

    def _op(self, w: Tensor) -> tuple[FakeQuantOp, Tensor]:
        s = self.effective_scale()
        return FakeQuantOp(floor_nest_fake, (self.high_bits, self.active_bits, self._grad_scale(w, s))), s

    @classmethod
    def nest_codes(cls, q_high: Tensor, high_bits: int, bits: int) -> Tensor:
        """``q_h >> k`` (truncation: transitive, so the ``max(kept)``-bit codes give every lower kept bit)."""
        return q_high.to(torch.int32) >> (high_bits - bits)

    @classmethod
    def fake_weight(cls, weight: Tensor, scale: Tensor, high_bits: int, bits: int) -> Tensor:
        with torch.no_grad():
            return floor_nest_fake(weight, scale, high_bits, bits)


@register_weight_quantizer("unshared")
class UnsharedWeightQuantizer(WeightQuantizer):
    """Baseline "Ours*": one LSQ scale per bit (``scales``), each initialised with LSQ's rule at its bit; the
    weights have no shared integer codes and are stored in FP32."""

    has_codes = False

    def _init_state(self, w: Tensor) -> None:
        self.scales = nn.ParameterDict({str(b): nn.Parameter(self._lsq_init(w, b)) for b in self.bits})

    def effective_scale(self) -> Tensor:
        """The active bit's ``|p| + eps``."""
        return _positive(self.scales[str(self.active_bits)])

    def scale_tensors(self) -> tuple[Tensor, ...]:
        return tuple(self.scales.values())

    def _op(self, w: Tensor) -> tuple[FakeQuantOp, Tensor]:
        s = self.effective_scale()
        g = lsq_grad_scale(w.numel() // s.numel(), qrange(self.active_bits, signed=True)[1])
        return kernels(self.kernel, w.device.type).lsq_op(self.active_bits, True, g), s
