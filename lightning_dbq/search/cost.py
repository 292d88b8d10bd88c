"""Per-layer cost inputs of the bit-allocation search: MACs, BOPs, quantization error and sensitivity costs.

Everything here returns plain NumPy arrays shaped ``(L, K)`` (one row per layer, one column per candidate bit,
in the order the candidate bits are given) that :class:`lightning_dbq.search.ilp.BitAllocationProblem` consumes.

Cost choices (see ``docs/math.md`` §8.1):

* :func:`hawq_cost` (recommended): ``c[l, j] = t̄_l · ‖Q_{b_j}(W_l) − W_l‖²`` with the *real* Double Rounding
  quantizer from the shared ``h``-bit scale (:func:`quantization_error_matrix`), i.e. ``½ ΔWᵀ H ΔW`` under an
  isotropic-Hessian assumption.
* :func:`paper_cost`: the paper's Algorithm 2 read literally, ``c[l, j] = t̄_l / b_j`` (minimized).

Traces ``t̄_l`` are per-parameter Hutchinson traces; negative estimates (noise) are clamped to 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dbq.quant.functional import MAX_BITS, MIN_BITS, double_round_fake

__all__ = [
    "average_bits",
    "bops_matrix",
    "hawq_cost",
    "layer_macs",
    "paper_cost",
    "quantization_error_matrix",
]


def _check_bits_list(bits: Sequence[int], name: str = "bits") -> np.ndarray:
    arr = np.asarray(list(bits))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}={list(bits)!r} must be a non-empty 1-D sequence of positive integers")
    if not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in bits):
        raise ValueError(f"{name}={list(bits)!r} must contain positive integers only")
    return arr.astype(np.int64)


def _check_traces(traces: Sequence[float], num_layers: int | None = None) -> np.ndarray:
    t = np.asarray(list(traces), dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"traces must be a non-empty 1-D sequence of floats, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"traces must be finite, got {t.tolist()}")
    if num_layers is not None and t.size != num_layers:
        raise ValueError(f"traces has {t.size} entries but errors has {num_layers} rows (one per layer)")
    return np.clip(t, 0.0, None)


def layer_macs(model: nn.Module, example_input: Tensor, layer_names: Sequence[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of the named Conv/Linear-like layers, measured on one forward pass.

    For a layer with weight ``(C_out, C_in/groups, *kernel)`` (convolutions) or ``(out, in)`` (linear):
    ``MACs = output elements per sample × weight.numel() / C_out``, i.e. ``× (C_in/groups)·kh·kw`` for a
    convolution and ``× in_features`` for a linear layer (token dimensions count as output elements).
    Transposed convolutions (weight ``(C_in, C_out/groups, *kernel)``) use
    ``input elements per sample × weight.numel() / C_in``. A layer called several times in the forward pass
    (weight sharing) accumulates its MACs.

    The forward runs under ``torch.no_grad`` in eval mode; hooks are removed and every submodule's train/eval
    mode is restored afterwards, also on error.

    Args:
        model: the network.
        example_input: one input batch; dimension 0 is the batch (use batch size 1). MACs are per sample.
        layer_names: names from ``model.named_modules()`` of modules with a ``weight`` of ``ndim >= 2``.

    Returns:
        ``{name: macs}`` in the order of ``layer_names``.

    Raises:
        ValueError: a name is unknown, has no matrix-like ``weight``, or is not called by the forward pass.
    """
    names = list(layer_names)
    if len(set(names)) != len(names):
        raise ValueError(f"layer_names contains duplicates: {names}")
    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise ValueError(f"example_input must have a batch dimension >= 1, got shape {tuple(example_input.shape)}")
    batch = int(example_input.shape[0])
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"layer {name!r} is not a submodule of the model (see model.named_modules())")
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            raise ValueError(
                f"layer {name!r} ({type(modules[name]).__name__}) has no weight with ndim >= 2; "
                "expected a Conv/Linear-like module"
            )
    macs: dict[str, int] = {}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            weight: Tensor = module.weight  # type: ignore[assignment]
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                x = inputs[0]
                assert isinstance(x, Tensor)
                per_sample, fan = x.numel() // batch, weight.numel() // weight.shape[0]
            else:
                if not isinstance(output, Tensor):
                    raise ValueError(f"layer {name!r} returned {type(output).__name__}, expected a Tensor")
                per_sample, fan = output.numel() // batch, weight.numel() // weight.shape[0]
            macs[name] = macs.get(name, 0) + int(per_sample) * int(fan)

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    missing = [n for n in names if n not in macs]
    if missing:
        raise ValueError(f"layers {missing} were not called during the forward pass of example_input")
    return {n: macs[n] for n in names}


def bops_matrix(macs: Sequence[int], bits: Sequence[int], act_bits: Sequence[int] | None = None) -> np.ndarray:
    """Bit operations ``BOPs[l, j] = MACs_l · b_j · a_j``.

    Args:
        macs: MACs per layer (length L), e.g. from :func:`layer_macs`.
        bits: candidate weight bits ``b_j`` (length K).
        act_bits: activation bits ``a_j`` paired with each candidate weight bit (length K); ``None`` means
            ``a_j = b_j`` (weights and activations switch together, ``w4a4``).

    Returns:
        float64 array of shape ``(L, K)``.
    """
    m = np.asarray(list(macs), dtype=np.float64)
    if m.ndim != 1 or m.size == 0 or np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError(f"macs must be a non-empty 1-D sequence of non-negative numbers, got {list(macs)!r}")
    b = _check_bits_list(bits)
    a = b if act_bits is None else _check_bits_list(act_bits, "act_bits")
    if a.shape != b.shape:
        raise ValueError(f"act_bits has {a.size} entries but bits has {b.size}: give one activation bit per candidate")
    return m[:, None] * (b * a).astype(np.float64)[None, :]


def quantization_error_matrix(
    weights: Sequence[Tensor], scales: Sequence[Tensor], high_bits: int, bits: Sequence[int]
) -> np.ndarray:
    """Squared Double Rounding error ``err[l, j] = ‖Q_{b_j}(W_l) − W_l‖²`` from the shared ``high_bits`` scale.

    ``Q_b`` is :func:`lightning_dbq.quant.functional.double_round_fake` (round-half-up, signed ranges, the clip of
    the ``b``-bit grid); the sum of squares is accumulated in float64.

    Args:
        weights: one weight tensor per layer.
        scales: the matching positive ``h``-bit scales (scalar or per-channel, broadcastable to the weight).
        high_bits: stored precision ``h`` (``2..8``).
        bits: candidate bits, each in ``[2, high_bits]``.

    Returns:
        float64 array of shape ``(L, K)``.
    """
    ws, ss = list(weights), list(scales)
    if len(ws) == 0 or len(ws) != len(ss):
        raise ValueError(f"weights ({len(ws)}) and scales ({len(ss)}) must be non-empty and of the same length")
    if not (MIN_BITS <= high_bits <= MAX_BITS):
        raise ValueError(f"high_bits={high_bits} must be in [{MIN_BITS}, {MAX_BITS}]")
    b = _check_bits_list(bits)
    if np.any(b < MIN_BITS) or np.any(b > high_bits):
        raise ValueError(f"bits={b.tolist()} invalid: every bit must be in [{MIN_BITS}, high_bits={high_bits}]")
    out = np.empty((len(ws), b.size), dtype=np.float64)
    with torch.no_grad():
        for i, (w, s) in enumerate(zip(ws, ss, strict=True)):
            if not bool((s > 0).all()):
                raise ValueError(f"scales[{i}] must be positive, got min {float(s.min())}")
            w64 = w.detach().double()
            for j, bit in enumerate(b.tolist()):
                w_hat = double_round_fake(w.detach(), s.detach(), high_bits, int(bit))
                out[i, j] = float((w_hat.double() - w64).pow(2).sum())
    return out


def hawq_cost(traces: Sequence[float], errors: np.ndarray) -> np.ndarray:
    """HAWQ-V2/V3 cost ``c[l, j] = max(t̄_l, 0) · err[l, j]``.

    Args:
        traces: per-parameter Hessian traces ``t̄_l`` (length L); negative estimates are clamped to 0.
        errors: ``(L, K)`` squared quantization errors, e.g. from :func:`quantization_error_matrix`.

    Returns:
        float64 array of shape ``(L, K)``.
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"errors must be a 2-D (L, K) array, got shape {e.shape}")
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("errors must be finite and non-negative")
    t = _check_traces(traces, e.shape[0])
    return t[:, None] * e


def paper_cost(traces: Sequence[float], bits: Sequence[int]) -> np.ndarray:
    """The paper's Algorithm 2 objective read literally: ``c[l, j] = max(t̄_l, 0) / b_j`` (to be minimized).

    More bits go to more sensitive layers, but ``1/b`` is a weak proxy for the error's ``≈4^{-b}`` decay;
    prefer :func:`hawq_cost`.

    Returns:
        float64 array of shape ``(L, K)``.
    """
    t = _check_traces(traces)
    b = _check_bits_list(bits).astype(np.float64)
    return t[:, None] / b[None, :]


def average_bits(config: Mapping[str, int], params: Mapping[str, int]) -> float:
    """Parameter-weighted average bits ``Σ n_l b_l / Σ n_l`` over the layers of ``config``.

    Args:
        config: ``{layer: bits}``.
        params: ``{layer: parameter count}``; must cover every layer of ``config`` (extras are ignored).
    """
    if not config:
        raise ValueError("config is empty: need at least one layer")
    missing = [name for name in config if name not in params]
    if missing:
        raise ValueError(f"params has no entry for layers {missing}")
    total = sum(int(params[n]) for n in config)
    if any(int(params[n]) <= 0 for n in config):
        raise ValueError("params must be positive for every layer of config")
    return sum(int(params[n]) * int(b) for n, b in config.items()) / total
