"""From a trained bit-switchable model to evaluated SubNets: problem construction, front, evaluation, outputs.

Pure torch/numpy/pulp (no Lightning): used by the post-fit search callback and by ``dbq-search``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dbq.quant.layers import iter_quantizers
from lightning_dbq.quant.prepare import bit_config, get_spec, quantized_layers, set_bits
from lightning_dbq.quant.registry import WEIGHT_QUANTIZERS, weight_quantizer_class
from lightning_dbq.search.cost import bops_matrix, hawq_cost, layer_macs, paper_cost, quantization_error_matrix
from lightning_dbq.search.hessian import LayerTrace
from lightning_dbq.search.ilp import Allocation, BitAllocationProblem, algorithm2_enumeration, pareto_front

__all__ = ["COSTS", "SubNet", "build_problem", "evaluate", "search_subnets", "write_pareto"]

COSTS = ("hawq", "paper")


@dataclass(frozen=True)
class SubNet:
    """One evaluated configuration of the front (``pareto.json`` row)."""

    avg_bits: float
    bops: float
    acc: float
    config: dict[str, int]
    cost: float

    def to_json(self) -> dict[str, Any]:
        """``{"avg_bits", "bops", "acc", "config", "cost"}``."""
        return {"avg_bits": self.avg_bits, "bops": self.bops, "acc": self.acc, "config": self.config, "cost": self.cost}


def build_problem(
    model: nn.Module, traces: Mapping[str, LayerTrace], example_input: Tensor, cost: str = "hawq"
) -> BitAllocationProblem:
    """The allocation instance of a prepared model.

    ``cost="hawq"``: ``c = t̄_l·‖Q_b(W_l) − W_l‖²`` with the real Double Rounding quantizer (default);
    ``cost="paper"``: the paper's literal ``t̄_l / b``. BOPs use ``MACs·b·b`` (w{b}a{b}).
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    spec = get_spec(model)
    if not weight_quantizer_class(spec.weight_mode).subnet_search:
        allowed = [name for name, cls in WEIGHT_QUANTIZERS.items() if cls.subnet_search]
        raise ValueError(f"SubNet search supports weight_mode in {allowed} only, got {spec.weight_mode!r}")
    infos = quantized_layers(model)
    names = [i.name for i in infos]
    missing = [n for n in names if n not in traces]
    if missing:
        raise ValueError(f"traces are missing quantized layers {missing[:5]}")
    bits = list(spec.bits)
    t = [traces[n].normalized for n in names]
    if cost == "hawq":
        quantizers = {q.name: q for q in iter_quantizers(model)}
        errors = quantization_error_matrix(
            [quantizers[n].layer.weight.detach() for n in names],
            [quantizers[n].weight_quant.effective_scale().detach() for n in names], spec.high_bits, bits,
        )  # fmt: skip
        c = hawq_cost(t, errors)
    else:
        c = paper_cost(t, bits)
    macs = layer_macs(model, example_input[:1], names)
    bops = bops_matrix([macs[n] for n in names], bits)
    return BitAllocationProblem(layers=tuple(names), params=tuple(i.params for i in infos), bits=tuple(bits),
                                cost=np.asarray(c, dtype=np.float64), bops=bops)  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module, config: int | Mapping[str, int], batches: Iterable[tuple[Tensor, Tensor]], device: Any = None
) -> float:
    """Top-1 accuracy of ``model`` at ``config`` on ``batches`` (eval mode, bits restored afterwards)."""
    saved, was_training = bit_config(model), model.training
    model.eval()
    set_bits(model, config)
    correct = total = 0
    try:
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(dim=-1) == y).sum())
            total += int(y.numel())
    finally:
        set_bits(model, saved)
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate(): no samples in `batches`")
    return correct / total


def search_subnets(
    model: nn.Module,
    problem: BitAllocationProblem,
    batches: Sequence[tuple[Tensor, Tensor]],
    budgets: Sequence[float] | None = None,
    *,
    method: str = "dp",
    max_bops: float | None = None,
    enumerate_alg2: bool = False,
    device: Any = None,
    progress: bool = True,
) -> list[SubNet]:
    """Front allocations at ``budgets`` (optionally plus the paper's Algorithm 2 neighbours), each evaluated."""
    allocations: list[Allocation] = pareto_front(problem, budgets, method=method, max_bops=max_bops)
    if enumerate_alg2:
        extra = []
        for a in allocations:
            extra += algorithm2_enumeration(problem, a.avg_bits + 1e-9)
        seen = {tuple(a.config.values()) for a in allocations}
        allocations += [a for a in extra if tuple(a.config.values()) not in seen]
    from tqdm.auto import tqdm

    out = []
    for a in tqdm(allocations, desc="evaluating SubNets", disable=not progress):
        acc = evaluate(model, a.config, batches, device)
        out.append(SubNet(avg_bits=a.avg_bits, bops=float(a.bops or 0.0), acc=acc, config=dict(a.config),
                          cost=float(a.cost)))  # fmt: skip
    return sorted(out, key=lambda s: (s.avg_bits, -s.acc))


def write_pareto(subnets: Sequence[SubNet], path: str | os.PathLike[str]) -> Path:
    """``pareto.json``: a list of rows sorted by ``avg_bits``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([s.to_json() for s in sorted(subnets, key=lambda s: s.avg_bits)], indent=2))
    return path
