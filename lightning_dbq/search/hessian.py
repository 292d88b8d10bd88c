"""Per-layer Hessian traces with Hutchinson's estimator (HAWQ-V2 style), pure torch.

For every parameter block ``W_l`` the estimator returns ``T_l = tr(H_ll)``, the trace of the diagonal block of the
Hessian of the dataset-mean loss, from Rademacher probes ``v`` (``+-1``): ``E[v^T H_ll v] = tr(H_ll)``.

Two estimators share one driver and one output type:

* :func:`hutchinson_traces` (use this one): *block-restricted* probes. Each block gets its own probe and its own
  Hessian-vector product ``H_ll v_l = d<g_l, v_l>/dW_l``. Per-sample variance ``2(||H_ll||_F^2 - sum_i H_ii^2)``:
  zero for a diagonal block, so one sample is exact there.
* :func:`hutchinson_traces_whole_model` (reference / benchmark baseline, PyHessian style): one probe over all
  blocks at once, one full HVP ``H v``, per-block dot products ``v_l^T (H v)_l``. Unbiased as well, but each
  estimate also carries the cross-block terms ``v_l^T H_lm v_m``, which add ``sum_{m != l} ||H_lm||_F^2`` to the
  variance (about 70x more samples for the last layer of a resnet18, see ``docs/math.md`` §6).

How the work is organised (time/memory trade-off):

* The loss is the mean over the whole dataset, ``L = sum_b (N_b / N) L_b`` (batches weighted by their size), so
  ``H = sum_b (N_b / N) H_b``. Each batch contributes ``(N_b / N) v^T H_b v`` to a sample.
* Samples are drawn in *passes*. In a pass, every batch runs one forward and one ``autograd.grad(...,
  create_graph=True)`` and that graph is reused for all the samples of the pass (a chunk), so only one batch's
  double-backward graph is alive at a time. The first pass draws ``min_samples``; later passes draw, per layer,
  the number the current standard error predicts is still needed (at most doubling the count), so there are a
  handful of passes and the extra forward/backward per pass is small compared with the HVPs.
* ``retain_graphs=True`` keeps every batch's graph across passes instead: no recomputation, but memory grows
  linearly with the number of batches (each kept graph holds that batch's activations plus its backward graph;
  one resnet18 batch of 64 measured +30% RSS on CPU). It saves ``(passes - 1) x batches`` forward/backward
  passes, small next to the HVPs, so the default recomputes. The results are identical either way. Without it,
  a pass only differentiates the blocks still being sampled, so the backward stops at the earliest of them.
* The block-restricted estimator stops sampling each layer as soon as that layer has converged
  (``SE / |mean| < rel_tol`` after at least ``min_samples``), so later passes only pay for the layers that are still
  noisy; a layer whose Hessian block is exactly zero (e.g. under a BN with ``gamma = 0``) has ``SE = 0`` and
  ``mean = 0`` and counts as converged. Everything stops at ``max_samples``.

Probes come from dedicated ``torch.Generator`` objects seeded from ``(seed, layer, sample[, batch])`` via
``numpy.random.SeedSequence``, so the global RNG is untouched and results do not depend on the pass schedule. The
block-restricted estimator draws an independent probe per batch (still unbiased; lower variance than reusing one
probe across batches), the whole-model one reuses the probe across batches, as PyHessian does.

The model is put in ``eval()`` during the computation (BatchNorm uses, and never updates, its running statistics)
and every submodule's train/eval flag is restored afterwards. Compute the traces on the FP32 model, not on the
fake-quantized one (rounding has zero curvature).

CPU: with more intra-op threads than free cores HVPs slow down by an order of magnitude (``docs/math.md`` §6);
set ``torch.set_num_threads`` to the free cores.

DDP: pass the *unwrapped* module (``ddp_model.module``), each rank its own equal-size shard of batches (ranks are
averaged with equal weights), ``progress=(rank == 0)``, and a ``reduce_fn``
that averages a tensor across ranks (e.g. ``all_reduce(t) / world_size``, on the parameters' device). Each
per-sample estimate vector is reduced before it is used, so every rank takes the same stopping decisions and
returns the same traces. Use ``seed + rank`` for independent probes per rank (lower variance) or one seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["LayerTrace", "hutchinson_traces", "hutchinson_traces_whole_model"]

LossFn = Callable[[Tensor, Tensor], Tensor]
ReduceFn = Callable[[Tensor], Tensor]
_Grads = list[Tensor | None]


@dataclass(frozen=True)
class LayerTrace:
    """Hutchinson estimate of one parameter block's Hessian trace.

    Attributes:
        name: key of the block in the ``params`` mapping.
        trace: raw estimate ``T_l = mean_s v_s^T H_ll v_s`` (may be negative).
        std_error: standard error of ``trace`` (sample std with ddof=1 over ``sqrt(num_samples)``); ``nan`` when
            ``num_samples == 1``.
        numel: number of elements ``n_l`` of the block.
        normalized: average eigenvalue ``T_l / n_l`` clamped at ``>= 0`` (HAWQ-V2's sensitivity).
        num_samples: number of Hutchinson samples behind ``trace``.
    """

    name: str
    trace: float
    std_error: float
    numel: int
    normalized: float
    num_samples: int


def _seed(*entropy: int) -> int:
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def _rademacher(like: Tensor, seed: int) -> Tensor:
    """``+-1`` tensor shaped like ``like`` from a dedicated generator (global RNG untouched)."""
    device = like.device if like.device.type in ("cpu", "cuda") else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    v = torch.randint(0, 2, like.shape, generator=gen, device=device, dtype=like.dtype)
    return v.mul_(2).sub_(1).to(like.device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _validate(
    batches: Sequence[tuple[Tensor, Tensor]],
    params: Mapping[str, nn.Parameter | Tensor],
    min_samples: int,
    max_samples: int,
    rel_tol: float,
) -> tuple[list[str], list[Tensor], list[float]]:
    if len(params) == 0:
        raise ValueError("`params` is empty: pass a mapping name -> weight tensor (e.g. conv/linear `.weight`).")
    names, tensors = list(params.keys()), list(params.values())
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise ValueError(f"`params[{name!r}]` must be a tensor with requires_grad=True, got {type(t).__name__}.")
    if len(batches) == 0:
        raise ValueError("`batches` is empty: pass at least one (inputs, targets) batch.")
    sizes = [int(x.shape[0]) if isinstance(x, Tensor) and x.ndim > 0 else 1 for x, _ in batches]
    if min(sizes) <= 0:
        raise ValueError(f"`batches` must all be non-empty, got batch sizes {sizes}.")
    if not (isinstance(min_samples, int) and isinstance(max_samples, int) and 1 <= min_samples <= max_samples):
        raise ValueError(
            f"`min_samples` and `max_samples` must be ints with 1 <= min_samples <= max_samples, "
            f"got min_samples={min_samples!r}, max_samples={max_samples!r}."
        )
    if not (math.isfinite(rel_tol) and rel_tol > 0):
        raise ValueError(f"`rel_tol` must be a finite float > 0, got {rel_tol!r}.")
    total = float(sum(sizes))
    return names, tensors, [s / total for s in sizes]


def _grads_with_graph(
    model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, tensors: list[Tensor], active: list[bool]
) -> _Grads:
    """``dL_b/dW`` with ``create_graph=True`` for the active blocks (``None`` elsewhere): the backward stops at the
    earliest active block, so passes where only late layers are still sampled are cheaper."""
    x, y = batch
    loss = loss_fn(model(x), y)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError("`loss_fn` must return a scalar tensor (use a mean-reduced loss).")
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on any tensor in `params` (it does not require grad).")
    wanted = [t for t, on in zip(tensors, active, strict=True) if on]
    grads = iter(torch.autograd.grad(loss, wanted, create_graph=True, allow_unused=True))
    return [next(grads) if on else None for on in active]


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return mean, se


def _chunk(values: list[float], min_samples: int, max_samples: int, rel_tol: float) -> int:
    """Samples still to draw for one layer in the next pass (0 = converged or capped)."""
    n = len(values)
    if n >= max_samples:
        return 0
    if n < max(min_samples, 2):
        return max(min_samples, 2) - n
    mean, se = _stats(values)
    if se == 0.0 or se < rel_tol * abs(mean):
        return 0
    needed = n * (se / (rel_tol * abs(mean))) ** 2 if mean != 0.0 else math.inf
    target = min(float(max_samples), math.ceil(1.1 * needed) if math.isfinite(needed) else math.inf)
    return int(max(1, min(target - n, n, max_samples - n)))


def _block_pass(
    grads: _Grads,
    tensors: list[Tensor],
    plan: list[int],
    offsets: list[int],
    seed: int,
    batch: int,
    out: Tensor,
) -> None:
    """Block-restricted probes: ``out[j, l] = v^T H_ll v`` for ``j < plan[l]``."""
    for layer, (g, w) in enumerate(zip(grads, tensors, strict=True)):
        if plan[layer] == 0 or g is None or not g.requires_grad:
            continue  # converged, or the block's Hessian is identically zero
        for j in range(plan[layer]):
            v = _rademacher(w, _seed(seed, layer, offsets[layer] + j, batch))
            (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
            if hv is not None:
                out[j, layer] = torch.sum(hv * v).to(out.dtype)


def _whole_pass(
    grads: _Grads,
    tensors: list[Tensor],
    plan: list[int],
    offsets: list[int],
    seed: int,
    batch: int,
    out: Tensor,
) -> None:
    """Whole-model probes (same probe for every batch): ``out[j, l] = v_l^T (H v)_l``."""
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    outputs = [g for g in grads if g is not None and g.requires_grad]
    if not outputs:
        return
    for j in range(max(plan)):
        vs = [_rademacher(w, _seed(seed, layer, offsets[layer] + j)) for layer, w in enumerate(tensors)]
        hvs = torch.autograd.grad(
            outputs,
            tensors,
            grad_outputs=[vs[i] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        for layer, (hv, v) in enumerate(zip(hvs, vs, strict=True)):
            if hv is not None:
                out[j, layer] = torch.sum(hv * v).to(out.dtype)


def _run(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    params: Mapping[str, nn.Parameter | Tensor],
    *,
    loss_fn: LossFn,
    min_samples: int,
    max_samples: int,
    rel_tol: float,
    seed: int,
    progress: bool,
    reduce_fn: ReduceFn | None,
    retain_graphs: bool,
    whole_model: bool,
) -> dict[str, LayerTrace]:
    names, tensors, weights = _validate(batches, params, min_samples, max_samples, rel_tol)
    device = tensors[0].device
    samples: list[list[float]] = [[] for _ in names]
    plan = [min_samples] * len(names)
    cache: dict[int, _Grads] = {}
    estimator = _whole_pass if whole_model else _block_pass
    desc = "hutchinson (whole-model)" if whole_model else "hutchinson (per-block)"
    with (
        _eval_mode(model),
        torch.enable_grad(),
        tqdm(total=max_samples, desc=desc, disable=not progress) as bar,
    ):
        while max(plan) > 0:
            offsets = [len(s) for s in samples]
            acc = torch.zeros(max(plan), len(names), dtype=torch.float64, device=device)
            for b, batch in enumerate(batches):
                active = [True] * len(names) if retain_graphs else [p > 0 for p in plan]
                grads = cache[b] if b in cache else _grads_with_graph(model, batch, loss_fn, tensors, active)
                if retain_graphs:
                    cache[b] = grads
                out = torch.zeros_like(acc)
                estimator(grads, tensors, plan, offsets, seed, b, out)
                acc.add_(out, alpha=weights[b])
                del grads
            for j in range(acc.shape[0]):
                row = acc[j] if reduce_fn is None else reduce_fn(acc[j])
                values = row.detach().to("cpu", torch.float64).tolist()
                for layer, value in enumerate(values):
                    if j < plan[layer]:
                        samples[layer].append(value)
            done = max(len(s) for s in samples)
            bar.update(done - bar.n)
            plan = [_chunk(s, min_samples, max_samples, rel_tol) for s in samples]
            if whole_model and max(plan) > 0:  # one HVP serves all layers: keep them in lockstep
                plan = [max(plan)] * len(names)
            bar.set_postfix(active=sum(p > 0 for p in plan))
    cache.clear()
    result = {}
    for name, tensor, values in zip(names, tensors, samples, strict=True):
        mean, se = _stats(values)
        n = tensor.numel()
        result[name] = LayerTrace(name, mean, se, n, max(mean / n, 0.0), len(values))
    return result


def hutchinson_traces(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    params: Mapping[str, nn.Parameter | Tensor],
    *,
    loss_fn: LossFn = F.cross_entropy,
    min_samples: int = 8,
    max_samples: int = 100,
    rel_tol: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    reduce_fn: ReduceFn | None = None,
    retain_graphs: bool = False,
) -> dict[str, LayerTrace]:
    """Per-layer Hessian traces with block-restricted Rademacher probes (the recommended estimator).

    The loss is ``sum_b (N_b / N) * loss_fn(model(x_b), y_b)``; per sample and block,
    ``e_l = sum_b (N_b / N) v_{l,b}^T H_{b,ll} v_{l,b}`` with ``H_ll v = autograd.grad(g_l, W_l, grad_outputs=v)``
    and ``g = autograd.grad(loss, params, create_graph=True)`` (``.grad`` is never touched). See the module
    docstring for the pass schedule, the memory/time trade-off, BN handling and DDP use.

    Args:
        model: the (FP32) network; put in ``eval()`` during the computation, all modes restored afterwards. Under
            DDP pass the unwrapped module.
        batches: fixed, un-augmented ``(inputs, targets)`` batches (about 1000 images in total); the first
            dimension of ``inputs`` is the batch size used for weighting.
        params: name -> block (e.g. conv/linear ``.weight``) whose trace is wanted; each must require grad.
        loss_fn: mean-reduced ``loss_fn(outputs, targets) -> scalar``.
        min_samples: samples drawn for every layer before testing convergence.
        max_samples: cap on samples per layer.
        rel_tol: a layer has converged when ``std_error / |trace| < rel_tol`` (or both are exactly 0).
        seed: seed of the probe generators.
        progress: show a tqdm progress bar.
        reduce_fn: applied to each per-sample estimate vector (1-D float64, one entry per layer, on the
            parameters' device) before it is used; under DDP it must average the tensor across ranks.
        retain_graphs: keep every batch's double-backward graph alive across passes (faster, memory grows with
            the number of batches) instead of recomputing it once per pass.

    Returns:
        ``{name: LayerTrace}`` in the order of ``params``.

    Raises:
        ValueError: on empty ``params``/``batches``, a block without ``requires_grad``, bad sample counts or
            tolerance, a non-scalar loss or a loss that does not depend on ``params``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3)).eval()
        >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> out = hutchinson_traces(model, [batch], {"0.weight": model[0].weight}, progress=False)
        >>> out["0.weight"].trace > 0
        True
    """
    return _run(
        model,
        batches,
        params,
        loss_fn=loss_fn,
        min_samples=min_samples,
        max_samples=max_samples,
        rel_tol=rel_tol,
        seed=seed,
        progress=progress,
        reduce_fn=reduce_fn,
        retain_graphs=retain_graphs,
        whole_model=False,
    )


def hutchinson_traces_whole_model(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    params: Mapping[str, nn.Parameter | Tensor],
    *,
    loss_fn: LossFn = F.cross_entropy,
    min_samples: int = 8,
    max_samples: int = 100,
    rel_tol: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    reduce_fn: ReduceFn | None = None,
    retain_graphs: bool = False,
) -> dict[str, LayerTrace]:
    """PyHessian-style reference: one Rademacher probe over all blocks, per-block dot products of ``H v``.

    Same arguments, stopping rule and output as :func:`hutchinson_traces`; the probe of a sample is shared by all
    batches (PyHessian's ``dataloader_hv_product``) and all layers are sampled in lockstep (one full HVP serves
    every layer). Unbiased, but each estimate also carries the cross-block terms ``v_l^T H_lm v_m``; kept as the
    test oracle and benchmark baseline.
    """
    return _run(
        model,
        batches,
        params,
        loss_fn=loss_fn,
        min_samples=min_samples,
        max_samples=max_samples,
        rel_tol=rel_tol,
        seed=seed,
        progress=progress,
        reduce_fn=reduce_fn,
        retain_graphs=retain_graphs,
        whole_model=True,
    )
