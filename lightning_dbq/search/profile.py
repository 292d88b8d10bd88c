"""Per-layer sensitivity of a prepared model: Hutchinson traces of its quantized weights, on the FP32 forward.

Pure torch: quantization is switched off during the computation (rounding has zero curvature, so traces of the
fake-quant model would be the Hessian of a surrogate), BatchNorm runs in eval mode with its running statistics
untouched. Results serialise to ``traces.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dbq.quant.prepare import quant_enabled, quantized_layers
from lightning_dbq.search.figures import pyplot, save_figure
from lightning_dbq.search.hessian import LayerTrace, hutchinson_traces

__all__ = ["load_traces", "plot_traces", "profile_traces", "save_traces", "shard_batches"]


def shard_batches(batches: Sequence[tuple[Tensor, Tensor]], rank: int, world_size: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s equal share of a fixed image set (the same ``batches`` on every rank).

    The images are split into ``world_size`` contiguous shards of ``N // world_size`` images each (the remainder
    is dropped so ranks can be averaged with equal weights), re-batched with the original batch size.

    Raises:
        ValueError: bad rank/world size, or fewer images than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return list(batches)
    xs = [x for x, _ in batches]
    ys = [y for _, y in batches]
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    per_rank = len(x_all) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(x_all)} calibration image(s) cannot be shared by {world_size} ranks")
    size = max(len(xs[0]), 1)
    lo = rank * per_rank
    x_mine, y_mine = x_all[lo : lo + per_rank], y_all[lo : lo + per_rank]
    return [(x_mine[i : i + size], y_mine[i : i + size]) for i in range(0, per_rank, size)]


def profile_traces(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    min_samples: int = 8,
    max_samples: int = 64,
    rel_tol: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, LayerTrace]:
    """Hutchinson traces of every quantized layer's weight (FP forward, eval-mode BN), keyed by layer name."""
    params: dict[str, Any] = {i.name: model.get_submodule(i.name).weight for i in quantized_layers(model)}
    with quant_enabled(model, False):
        return hutchinson_traces(
            model, batches, params, min_samples=min_samples, max_samples=max_samples, rel_tol=rel_tol, seed=seed,
            progress=progress, reduce_fn=reduce_fn,
        )  # fmt: skip


def save_traces(traces: Mapping[str, LayerTrace], path: str | os.PathLike[str]) -> Path:
    """Write ``{layer: {trace, std_error, numel, normalized, num_samples}}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {name: {"trace": t.trace, "std_error": t.std_error, "numel": t.numel, "normalized": t.normalized,
                   "num_samples": t.num_samples} for name, t in traces.items()}  # fmt: skip
    path.write_text(json.dumps(rows, indent=2))
    return path


def load_traces(path: str | os.PathLike[str], layers: Sequence[str] | None = None) -> dict[str, LayerTrace]:
    """Read ``traces.json``; with ``layers``, check it covers exactly those layers.

    Raises:
        FileNotFoundError: missing file.
        ValueError: the file's layers differ from ``layers``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"traces file not found: {path}")
    rows: dict[str, Any] = json.loads(path.read_text())
    if layers is not None and set(rows) != set(layers):
        missing, extra = sorted(set(layers) - set(rows)), sorted(set(rows) - set(layers))
        raise ValueError(f"{path}: traces do not match the model's quantized layers (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")  # fmt: skip
    return {n: LayerTrace(name=n, trace=float(r["trace"]), std_error=float(r["std_error"]), numel=int(r["numel"]),
                          normalized=float(r["normalized"]), num_samples=int(r["num_samples"]))
            for n, r in rows.items()}  # fmt: skip


def plot_traces(traces: Mapping[str, LayerTrace], path: str | os.PathLike[str]) -> Path:
    """Bar plot of the normalised traces (log scale) with their standard errors."""
    plt = pyplot()
    names = list(traces)
    values = [max(traces[n].normalized, 1e-12) for n in names]
    errors = [traces[n].std_error / max(traces[n].numel, 1) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), values, yerr=errors, color="tab:purple", capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("Hessian trace / #params")
    ax.set_title("per-layer sensitivity (Hutchinson, FP32 forward)")
    return save_figure(fig, path)
