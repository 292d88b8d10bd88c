"""Weight and activation quantizer modules (thin shells around :mod:`lightning_dbq.quant.functional`).

* :class:`WeightQuantizer` — Double Rounding: ONE learned scale ``s_h`` per layer (per-tensor by default,
  per-output-channel as an option) shared by every candidate bit; only the ``h``-bit codes are ever stored.
* :class:`ActQuantizer` — LSQ with one learned scale per candidate bit (activations are not stored, so nothing
  forces them to share a scale); unsigned after non-negative inputs, signed otherwise; initialised from the first
  batch it sees (averaged over ranks under ``torch.distributed``).

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
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_dbq.quant.functional import double_round_codes, floor_nest_fake, lsq_grad_scale, qrange
from lightning_dbq.quant.kernels import check_kernel, kernels

__all__ = ["SCALE_EPS", "ActQuantizer", "WeightQuantizer", "relative_scale"]

SCALE_EPS = 1e-8


def _positive(p: Tensor) -> Tensor:
    return p.abs() + SCALE_EPS


def relative_scale(p: Tensor, ref: Tensor) -> Tensor:
    """``s = ref · (|p| + eps)`` whose gradient with respect to ``p`` is ``sign(p) · ∂L/∂s / ref``.

    The forward value is exactly ``ref · (|p| + eps)`` (the straight-through term adds an exact zero); see the
    module docstring for why the gradient is divided by ``ref`` instead of multiplied.
    """
    a = _positive(p)
    frozen = a.detach()
    return ref * frozen + (a - frozen) / ref


class WeightQuantizer(nn.Module):
    """Double Rounding weight quantizer with one shared learned scale.

    .. math:: \\hat W_l = \\mathrm{clamp}(\\lfloor q_h / 2^k + 1/2 \\rfloor) \\cdot 2^k \\cdot s_h

    The scale is initialised for the *lowest* candidate bit so low bits are not all zeros (docs/math.md §2.3):
    ``s_h = 2·mean|W| / sqrt(Q_P(l_min)) / 2^(h − l_min)``. The LSQ gradient scale uses ``N`` = number of weights
    sharing one scale and ``Q_P(h)``.

    Baselines (``mode``): ``"floor"`` nests by truncation (``q_h >> k``) from the same shared scale;
    ``"unshared"`` keeps one LSQ scale per bit (``scales``), initialised with LSQ's rule at each bit, and needs
    FP32 weight storage.

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
        bits: candidate bits (validated by the caller), any order.
        per_channel: one scale per output channel (dim 0) instead of one per tensor.
        mode: ``"double_round"`` (default), ``"floor"`` or ``"unshared"``.
        kernel: fake-quant back-end, ``"fused"`` | ``"eager"`` | ``"compile"`` (:mod:`lightning_dbq.quant.kernels`).
    """

    scale_ref: Tensor
    _cache: dict[int, Tensor]
    _cache_state: tuple[Any, ...] | None
    _cache_refs: tuple[weakref.ref[Tensor], ...]

    def __init__(
        self,
        weight: Tensor,
        bits: Sequence[int],
        per_channel: bool = False,
        mode: str = "double_round",
        kernel: str = "fused",
    ) -> None:
        super().__init__()
        if mode not in ("double_round", "floor", "unshared"):
            raise ValueError(f"mode must be 'double_round', 'floor' or 'unshared', got {mode!r}")
        self.kernel: str = check_kernel(kernel)
        self.bits: tuple[int, ...] = tuple(sorted(bits, reverse=True))
        self.high_bits: int = self.bits[0]
        self.active_bits: int = self.high_bits
        self.enabled: bool = True
        self.per_channel = per_channel
        self.mode = mode
        self._cache = {}
        self._cache_state, self._cache_refs = None, ()
        w = weight.detach()
        if mode == "unshared":
            self.scales = nn.ParameterDict({str(b): nn.Parameter(self._lsq_init(w, b)) for b in self.bits})
        else:
            low = self.bits[-1]
            init = self._lsq_init(w, low) / float(1 << (self.high_bits - low))
            self.register_buffer("scale_ref", init)
            self.scale = nn.Parameter(torch.ones_like(init))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, missing_keys: list[str],
        unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        key, ref_key = prefix + "scale", prefix + "scale_ref"
        if self.mode != "unshared" and key in state_dict and ref_key not in state_dict:
            # a state dict from before the relative parametrisation: s = |p| + eps  ->  s_ref = |p| + eps, p = 1
            old = state_dict[key]
            state_dict[ref_key] = _positive(old.detach())
            state_dict[key] = torch.ones_like(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _lsq_init(self, w: Tensor, bits: int) -> Tensor:
        """``2·mean|W| / sqrt(Q_P(bits))`` (per tensor or per output channel)."""
        if self.per_channel:
            mean_abs = w.abs().float().reshape(w.shape[0], -1).mean(dim=1)
            mean_abs = mean_abs.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
        else:
            mean_abs = w.abs().float().mean()
        return (2.0 * mean_abs / math.sqrt(qrange(bits, signed=True)[1])).clamp_min(1e-6)

    def effective_scale(self) -> Tensor:
        """The positive scale actually used: ``s_ref·(|p| + eps)`` (the active bit's ``|p| + eps`` when unshared)."""
        if self.mode == "unshared":
            return _positive(self.scales[str(self.active_bits)])
        return relative_scale(self.scale, self.scale_ref)

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
        scales = tuple(self.scales.values()) if self.mode == "unshared" else (self.scale, self.scale_ref)
        key: list[Any] = [self.kernel, self.mode]
        refs = []
        try:
            for t in (w, *scales):
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
        super().__setstate__(state)
        self.__dict__.setdefault("_cache", {})  # pickles from before the cache existed
        self.__dict__.setdefault("_cache_state", None)
        self.__dict__.setdefault("_cache_refs", ())

    def _fake_quant(self, w: Tensor) -> Tensor:
        s = self.effective_scale()
        n = w.numel() // s.numel()
        if self.mode == "unshared":
            g = lsq_grad_scale(n, qrange(self.active_bits, signed=True)[1])
            return kernels(self.kernel).lsq(w, s, self.active_bits, True, g)
        g = lsq_grad_scale(n, qrange(self.high_bits, signed=True)[1])
        if self.mode == "floor":
            return floor_nest_fake(w, s, self.high_bits, self.active_bits, g)
        return kernels(self.kernel).double_round(w, s, self.high_bits, self.active_bits, g)

    def codes(self, w: Tensor) -> Tensor:
        """The stored ``h``-bit integer codes of ``w`` as int8 (shared-scale modes only)."""
        if self.mode == "unshared":
            raise ValueError("weight_mode='unshared' has no shared integer codes (FP32 storage)")
        q_h, _ = double_round_codes(w, self.effective_scale().detach(), self.high_bits, self.high_bits)
        return q_h.to(torch.int8)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, active_bits={self.active_bits}, per_channel={self.per_channel}, mode={self.mode!r}, "
            f"kernel={self.kernel!r}"
        )


class ActQuantizer(nn.Module):
    """LSQ activation quantizer with one learned scale per candidate bit.

    Initialised lazily from the first batch: the sign (unsigned iff the batch is non-negative) and
    ``s_b = 2·mean|x| / sqrt(Q_P(b))`` for every ``b``. The LSQ gradient scale is ``1/sqrt(N·Q_P(b))`` with ``N`` the
    number of elements *per sample* (``x[0].numel()``).

    Args:
        bits: candidate bits, any order.
        kernel: fake-quant back-end, ``"fused"`` | ``"eager"`` | ``"compile"`` (:mod:`lightning_dbq.quant.kernels`).
    """

    initialized: Tensor
    signed: Tensor

    def __init__(self, bits: Sequence[int], kernel: str = "fused") -> None:
        super().__init__()
        self.kernel: str = check_kernel(kernel)
        self.bits: tuple[int, ...] = tuple(sorted(bits, reverse=True))
        self.active_bits: int = self.bits[0]
        self.enabled: bool = True
        # One Parameter per bit so that optimizers (momentum, Adam state) never move another bit's scale.
        self.scales = nn.ParameterDict({str(b): nn.Parameter(torch.ones(())) for b in self.bits})
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(False))
        # Python mirrors of the two buffers: reading a tensor as bool on every forward costs a sync on GPU and a
        # graph break under torch.compile. Re-read from the buffers after any state_dict load.
        self._cached: tuple[bool, bool] | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the sign and every per-bit scale from a batch (averaged across ranks when distributed)."""
        stats = torch.stack([x.detach().float().abs().mean(), -x.detach().float().min()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mean_abs = stats[:1].clone()
            dist.all_reduce(mean_abs, op=dist.ReduceOp.SUM)
            neg = stats[1:].clone()
            dist.all_reduce(neg, op=dist.ReduceOp.MAX)
            stats = torch.cat([mean_abs / dist.get_world_size(), neg])
        mean_abs_f, neg_min = float(stats[0]), float(stats[1])
        signed = neg_min > 0.0
        self.signed.fill_(signed)
        for b in self.bits:
            q_p = qrange(b, signed)[1]
            self.scales[str(b)].data.fill_(max(2.0 * mean_abs_f / math.sqrt(q_p), 1e-6))
        self.initialized.fill_(True)
        self._cached = (True, signed)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` at :attr:`active_bits` (identity when disabled)."""
        if not self.enabled:
            return x
        if self._cached is None:
            if not bool(self.initialized):
                self.initialize(x)
            self._cached = (True, bool(self.signed))
        signed = self._cached[1]
        b = self.active_bits
        g = lsq_grad_scale(max(x[0].numel(), 1), qrange(b, signed)[1])
        return kernels(self.kernel).lsq(x, _positive(self.scales[str(b)]), b, signed, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, active_bits={self.active_bits}, kernel={self.kernel!r}"
