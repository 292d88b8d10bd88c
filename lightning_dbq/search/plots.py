"""Plots of a search: the accuracy / average-bits front and a per-layer bit-width heatmap."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning_dbq.search.figures import pyplot, save_figure
from lightning_dbq.search.subnet import SubNet

__all__ = ["plot_bit_heatmap", "plot_pareto"]


def plot_pareto(
    subnets: Sequence[SubNet], path: str | os.PathLike[str], uniform: Mapping[int, float] | None = None,
    baseline: Sequence[SubNet] | None = None, labels: tuple[str, str] = ("HASB", "uniform sampling"),
) -> Path:  # fmt: skip
    """Validation accuracy vs parameter-weighted average bits (front), with uniform-bit points and a baseline."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [s.avg_bits for s in subnets]
    ax.plot(xs, [100 * s.acc for s in subnets], "o-", label=f"searched SubNets ({labels[0]})")
    if baseline:
        ax.plot([s.avg_bits for s in baseline], [100 * s.acc for s in baseline], "s--", label=labels[1])
    if uniform:
        ax.plot(list(uniform), [100 * v for v in uniform.values()], "k*", markersize=10, label="uniform w{b}a{b}")
    ax.set_xlabel("average bits (parameter-weighted)")
    ax.set_ylabel("val accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("accuracy / size front")
    return save_figure(fig, path)


def plot_bit_heatmap(subnets: Sequence[SubNet], path: str | os.PathLike[str]) -> Path:
    """Layers (rows) × SubNets (columns, by average bits) coloured by bit-width."""
    plt = pyplot()
    layers = list(subnets[0].config) if subnets else []
    grid = [[s.config[n] for s in subnets] for n in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(subnets) + 2), max(3.0, 0.22 * len(layers) + 1)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6)
    ax.set_xticks(range(len(subnets)))
    ax.set_xticklabels([f"{s.avg_bits:.2f}" for s in subnets], rotation=90, fontsize=7)
    ax.set_xlabel("SubNet (average bits)")
    fig.colorbar(im, ax=ax, label="bits")
    ax.set_title("per-layer bit-widths of the searched SubNets")
    return save_figure(fig, path)
