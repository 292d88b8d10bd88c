"""One search pipeline, shared by the post-fit :class:`~lightning_dbq.training.callbacks.SubNetSearch` callback and
``dbq-search``: traces → allocation problem → front → evaluation (front and uniform bits) → ``pareto.json`` + plots
→ a Rich table.

Every step sees the model with the weights the served int model has (:func:`served_weights`): each quantized
layer's ``h``-bit grid weight ``q_h·s_h``, which is what :func:`~lightning_dbq.load_int` puts into a model. A
DBQModule checkpoint holds the latent FP32 weights ``W`` instead (an artifact cannot hold them), so profiling ``W``
from a ``.ckpt`` and ``q_h·s_h`` from the artifact of the same run gave different traces (Hutchinson's adaptive
stopping rule amplifies the ~1 % weight difference into 2-10 % trace differences) and different fronts; on the
grid weights both give the same traces, costs and SubNets. Fake-quantized forwards are unchanged by the swap: every
bit's codes derive from ``q_h``, which the grid weight reproduces exactly.

Pure torch/numpy (no Lightning, no Hydra).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.quant.prepare import bit_config, get_spec, quantized_layers, set_bits
from lightning_dbq.search.hessian import LayerTrace
from lightning_dbq.search.profile import plot_traces, profile_traces, save_traces
from lightning_dbq.search.subnet import SubNet, build_problem, evaluate, search_subnets, write_pareto

__all__ = [
    "SearchResult",
    "default_budgets",
    "evaluate_uniform",
    "layer_names",
    "print_subnets",
    "search_front",
    "served_traces",
    "served_weights",
    "write_search_outputs",
]

Batches = Sequence[tuple[Tensor, Tensor]]


def default_budgets(bits: Sequence[int], step: float = 0.5) -> list[float]:
    """``min(bits), min(bits) + step, ..., max(bits)``."""
    return [float(x) for x in np.arange(min(bits), max(bits) + 1e-9, step)]


@contextlib.contextmanager
def served_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily give every quantized layer its ``h``-bit grid weight ``q_h·s_h`` and the highest bit.

    The grid weight is computed exactly as :func:`~lightning_dbq.load_int` decodes an artifact, so a model loaded
    from an artifact is unchanged (bit for bit) and a model from a checkpoint becomes the model its artifact would
    serve. The highest bit is active inside (per-bit norms then use their ``h``-bit statistics, in both cases).
    Latent weights and bit state are restored on exit, also on error. Layers without shared codes
    (:attr:`~lightning_dbq.quant.quantizers.WeightQuantizer.has_codes` False, e.g. ``weight_mode="unshared"``,
    stored in FP32) keep their weights.
    """
    spec = get_spec(model)
    saved_bits = bit_config(model)
    latent: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for q in iter_quantizers(model):
                wq = q.weight_quant
                if wq.has_codes:
                    w: Tensor = q.layer.weight
                    grid = wq.decode(wq.codes(w), wq.high_bits)
                    latent.append((w, w.detach().clone()))
                    w.copy_(grid.to(w.dtype))
        with contextlib.suppress(ValueError):  # a slim-loaded model may not run at h bits: keep its bits
            set_bits(model, spec.high_bits)
        yield model
    finally:
        with torch.no_grad():
            for w, value in latent:
                w.copy_(value)
        set_bits(model, saved_bits)


def served_traces(
    model: nn.Module,
    batches: Batches,
    *,
    min_samples: int = 8,
    max_samples: int = 64,
    rel_tol: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, LayerTrace]:
    """Per-layer Hutchinson traces (FP forward, eval-mode BN) of the served grid weights (:func:`served_weights`).

    Same arguments as :func:`~lightning_dbq.search.profile.profile_traces`; a checkpoint and the int artifact of
    the same model give identical traces.
    """
    with served_weights(model):
        return profile_traces(model, batches, min_samples=min_samples, max_samples=max_samples, rel_tol=rel_tol,
                              seed=seed, progress=progress, reduce_fn=reduce_fn)  # fmt: skip


def evaluate_uniform(
    model: nn.Module, batches: Batches, bits: Sequence[int] | None = None, device: Any = None
) -> dict[int, float]:
    """Top-1 accuracy at every uniform bit-width (default: every candidate bit), ``{bits: acc}``."""
    return {int(b): evaluate(model, int(b), batches, device) for b in (bits or get_spec(model).bits)}


@dataclass(frozen=True)
class SearchResult:
    """What one search produced.

    Attributes:
        subnets: the evaluated front, sorted by average bits.
        uniform: accuracy of every uniform bit-width, ``{bits: acc}``.
        traces: the per-layer traces the costs used.
        n_layers: number of quantized layers.
    """

    subnets: list[SubNet]
    uniform: dict[int, float]
    traces: dict[str, LayerTrace]
    n_layers: int

    def rows(self) -> list[dict[str, Any]]:
        """The ``pareto.json`` rows."""
        return [s.to_json() for s in self.subnets]


def search_front(
    model: nn.Module,
    traces: Mapping[str, LayerTrace],
    batches: Batches,
    *,
    budgets: Sequence[float] | None = None,
    method: str = "dp",
    cost: str = "hawq",
    max_bops: float | None = None,
    enumerate_alg2: bool = False,
    device: Any = None,
    progress: bool = True,
) -> SearchResult:
    """Allocation problem, front at ``budgets`` (default :func:`default_budgets`), evaluated SubNets and uniform bits.

    Runs on the served grid weights (:func:`served_weights`): the HAWQ costs ``t̄_l·‖Q_b(W) − W‖²`` measure the
    distance to the served ``h``-bit model, the same from a checkpoint and from its artifact.

    Args:
        model: a prepared (double_round) model with initialised activation scales.
        traces: per-layer traces (e.g. :func:`served_traces`, or a reused ``traces.json``).
        batches: evaluation ``(x, y)`` batches; the first input gives the MAC counts.
        budgets: average-bit budgets.
        method, cost, max_bops, enumerate_alg2: see :func:`~lightning_dbq.search.subnet.search_subnets` and
            :func:`~lightning_dbq.search.subnet.build_problem`.
        device: where batches are moved for evaluation.
        progress: tqdm bar over the SubNets.
    """
    if not batches:
        raise ValueError("search_front(): no evaluation batches")
    with served_weights(model):
        example = batches[0][0] if device is None else batches[0][0].to(device)
        problem = build_problem(model, traces, example, cost=cost)
        subnets = search_subnets(
            model, problem, batches, list(budgets) if budgets else default_budgets(get_spec(model).bits),
            method=method, max_bops=max_bops, enumerate_alg2=enumerate_alg2, device=device, progress=progress,
        )  # fmt: skip
        uniform = evaluate_uniform(model, batches, device=device)
    return SearchResult(subnets, uniform, dict(traces), len(problem.layers))


def write_search_outputs(
    result: SearchResult, output_dir: str | os.PathLike[str], *, traces: bool = False
) -> dict[str, Path]:
    """Write ``pareto.json``, ``pareto.png``, ``bit_heatmap.png`` (and ``traces.json`` / ``traces.png``)."""
    from lightning_dbq.search.plots import plot_bit_heatmap, plot_pareto

    out = Path(output_dir)
    paths = {
        "pareto": write_pareto(result.subnets, out / "pareto.json"),
        "pareto_png": plot_pareto(result.subnets, out / "pareto.png", uniform=result.uniform),
        "heatmap_png": plot_bit_heatmap(result.subnets, out / "bit_heatmap.png"),
    }
    if traces:
        paths["traces"] = save_traces(result.traces, out / "traces.json")
        paths["traces_png"] = plot_traces(result.traces, out / "traces.png")
    return paths


def print_subnets(subnets: Sequence[SubNet], n_layers: int, console: Any = None) -> None:
    """Rich table of the front: average bits, GBOPs, accuracy."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"searched SubNets ({n_layers} layers)")
    for col in ("avg bits", "GBOPs", "val acc"):
        table.add_column(col, justify="right")
    for s in subnets:
        table.add_row(f"{s.avg_bits:.2f}", f"{s.bops / 1e9:.3f}", f"{100 * s.acc:.2f} %")
    (console or Console()).print(table)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the quantized layers, in model order."""
    return [i.name for i in quantized_layers(model)]
