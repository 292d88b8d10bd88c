"""Mixed-precision bit allocation: the one-hot ILP (PuLP + bundled CBC) and the exact DP Pareto front.

Formulation (``docs/math.md`` §8.2), binaries ``x[l, j]`` for layer ``l`` and candidate bit ``b_j``:
``min Σ c[l,j]·x[l,j]`` s.t. ``Σ_j x[l,j] = 1``, ``Σ n_l·b_j·x[l,j] / Σ n_l <= ω`` (parameter-weighted average
bits), optionally ``Σ BOPs[l,j]·x[l,j] <= max_bops``, and ``x[l,·] = x[m,·]`` for tied layers.

Numerics (a measured pitfall, ``docs/math.md`` §8.2): raw costs (1e-6..1e-2) with raw sizes (~1e7) make CBC
return *sub-optimal* answers even with ``gapRel=0``. So (i) the size row is divided by ``Σ n_l`` (right-hand side
``ω``); (ii) each cost row is shifted by its minimum (a constant, it does not change the argmin) and scaled so that
the sum over layers of each row's smallest positive entry is ``100``, and CBC's cutoff ``increment`` is made
negligible;
(iii) tied layers share one set of binaries; (iv) the returned configuration is re-checked in exact integer
arithmetic and excluded by a no-good cut if CBC's feasibility tolerance let it exceed the budget. Reported costs
are always the raw, unscaled ones. :func:`pareto_front_dp` is the exact, much faster alternative to sweeping the
ILP over budgets; the ILP is needed for BOPs budgets and fixed layers.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Allocation",
    "BitAllocationProblem",
    "InfeasibleError",
    "algorithm2_enumeration",
    "pareto_front",
    "pareto_front_dp",
    "solve_ilp",
]

_SIZE_ATOL = 1e-6  # bits; sizes Σ n_l b_l are integers, so this only absorbs the float product ω·Σ n_l
_BOPS_RTOL = 1e-9
_OBJECTIVE_TARGET = 100.0  # Σ_l (smallest positive shifted cost of layer l) after scaling
# CBC discards solutions less than `increment` (default 1e-5) better than the incumbent; on the scaled objective
# that lost optima by ~1e-6 relative in our brute-force checks, so make it negligible.
_CBC_INC = "increment 1e-9"
_MAX_COEF = 1e7


class InfeasibleError(ValueError):
    """No bit configuration satisfies the budget (average bits, BOPs, fixed layers, ties)."""


def _matrix(value: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != shape or not np.all(np.isfinite(arr)) or (name == "bops" and np.any(arr < 0)):
        kind = "finite non-negative" if name == "bops" else "finite"
        raise ValueError(f"{name} must be a {kind} array of shape (layers, bits)={shape}, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class BitAllocationProblem:
    """A bit-allocation instance: per-layer sizes, candidate bits and a ``(L, K)`` cost matrix.

    Attributes:
        layers: layer names (unique), length L.
        params: parameter count ``n_l > 0`` per layer.
        bits: candidate bits (unique positive integers), length K, in the column order of ``cost``/``bops``.
        cost: ``(L, K)`` finite cost, e.g. :func:`lightning_dbq.search.cost.hawq_cost`.
        bops: optional ``(L, K)`` non-negative BOPs (:func:`lightning_dbq.search.cost.bops_matrix`).
        ties: pairs of layer names that must get the same bits (e.g. downsample ↔ main conv).
    """

    layers: tuple[str, ...]
    params: tuple[int, ...]
    bits: tuple[int, ...]
    cost: np.ndarray
    bops: np.ndarray | None = None
    ties: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        layers, params, bits = tuple(self.layers), tuple(self.params), tuple(self.bits)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be non-empty and unique, got {list(layers)}")
        if len(params) != len(layers) or any(int(n) != n or n <= 0 for n in params):
            raise ValueError(f"params must be {len(layers)} positive integers (one per layer), got {list(params)}")
        if not bits or len(set(bits)) != len(bits) or any(int(b) != b or b <= 0 for b in bits):
            raise ValueError(f"bits must be non-empty, unique positive integers, got {list(bits)}")
        shape = (len(layers), len(bits))
        cost = _matrix(self.cost, "cost", shape)
        bops = None if self.bops is None else _matrix(self.bops, "bops", shape)
        ties = tuple((str(a), str(b)) for a, b in self.ties)
        unknown = sorted({n for pair in ties for n in pair} - set(layers))
        if unknown:
            raise ValueError(f"ties name unknown layers {unknown}; allowed: the problem's layers")
        values = {"layers": layers, "params": tuple(map(int, params)), "bits": tuple(map(int, bits))}
        for name, value in {**values, "cost": cost, "bops": bops, "ties": ties}.items():
            object.__setattr__(self, name, value)

    @property
    def total_params(self) -> int:
        """``Σ n_l``."""
        return sum(self.params)


@dataclass(frozen=True)
class Allocation:
    """One bit configuration with its raw cost, parameter-weighted average bits and (optional) total BOPs."""

    config: dict[str, int]
    cost: float
    avg_bits: float
    bops: float | None


@dataclass(frozen=True)
class _Groups:
    """Tied layers merged into groups: group ``g`` has one bit for all its layers."""

    of_layer: np.ndarray  # (L,) group index of each layer
    size: np.ndarray  # (G, K) int64: (Σ_{l∈g} n_l) · b_j
    cost: np.ndarray  # (G, K) float64: Σ_{l∈g} c_{l,j}
    bops: np.ndarray | None  # (G, K)


def _groups(problem: BitAllocationProblem) -> _Groups:
    L, index, label = len(problem.layers), {n: i for i, n in enumerate(problem.layers)}, np.arange(len(problem.layers))
    for a, b in problem.ties:  # merge the two groups under the smaller label
        keep, drop = sorted((label[index[a]], label[index[b]]))
        label[label == drop] = keep
    of_layer = np.unique(label, return_inverse=True)[1].reshape(L)
    member = np.zeros((int(of_layer.max()) + 1, L))
    member[of_layer, np.arange(L)] = 1.0
    n_g = np.zeros(member.shape[0], dtype=np.int64)
    np.add.at(n_g, of_layer, np.asarray(problem.params, dtype=np.int64))
    size = n_g[:, None] * np.asarray(problem.bits, dtype=np.int64)[None, :]
    return _Groups(of_layer, size, member @ problem.cost, None if problem.bops is None else member @ problem.bops)


def _allocations(problem: BitAllocationProblem, grp: _Groups, choice: np.ndarray) -> list[Allocation]:
    """Allocations for group choices ``choice`` of shape ``(G, M)`` (column indices into ``bits``)."""
    layer_choice = choice[grp.of_layer]  # (L, M)
    rows = np.arange(len(problem.layers))[:, None]
    bits = np.asarray(problem.bits, dtype=np.int64)
    costs = problem.cost[rows, layer_choice].sum(axis=0).tolist()
    avg = (np.asarray(problem.params, dtype=np.int64)[:, None] * bits[layer_choice]).sum(axis=0) / problem.total_params
    bops = [None] * len(costs) if problem.bops is None else problem.bops[rows, layer_choice].sum(axis=0).tolist()
    gc_enabled = gc.isenabled()
    gc.disable()  # a whole front is ~1e5 lists and dicts: generational GC passes would more than double the time
    try:
        configs = bits[layer_choice].T.tolist()
        rows_m = zip(configs, costs, avg.tolist(), bops, strict=True)
        return [Allocation(dict(zip(problem.layers, r, strict=True)), c, a, b) for r, c, a, b in rows_m]
    finally:
        if gc_enabled:
            gc.enable()


def _fits(grp: _Groups, choice: np.ndarray, size_cap: float, max_bops: float | None) -> bool:
    g = np.arange(len(choice))
    bops_ok = max_bops is None or grp.bops is None or float(grp.bops[g, choice].sum()) <= max_bops * (1 + _BOPS_RTOL)
    return bops_ok and int(grp.size[g, choice].sum()) <= size_cap


def _check_budget(avg_bits: float, problem: BitAllocationProblem) -> float:
    omega = float(avg_bits)
    if not np.isfinite(omega):
        raise ValueError(f"avg_bits={avg_bits} must be a finite number")
    if omega * problem.total_params + _SIZE_ATOL < (lo := min(problem.bits)) * problem.total_params:
        raise InfeasibleError(f"avg_bits={avg_bits} is infeasible: must be >= {lo} (the lowest candidate bit)")
    return omega


def _allowed(problem: BitAllocationProblem, grp: _Groups, fixed: Mapping[str, int] | None) -> np.ndarray:
    allowed = np.ones(grp.size.shape, dtype=bool)
    for name, bit in (fixed or {}).items():
        if name not in problem.layers:
            raise ValueError(f"fixed names unknown layer {name!r}; allowed: {list(problem.layers)}")
        if bit not in problem.bits:
            raise ValueError(f"fixed[{name!r}]={bit} is not a candidate bit; allowed: {list(problem.bits)}")
        g = int(grp.of_layer[problem.layers.index(name)])
        if not allowed[g, problem.bits.index(bit)]:
            raise InfeasibleError(f"fixed={dict(fixed or {})} pins tied layers to different bits")
        allowed[g] = np.asarray(problem.bits) == bit
    return allowed


def solve_ilp(
    problem: BitAllocationProblem,
    avg_bits: float,
    *,
    max_bops: float | None = None,
    fixed: Mapping[str, int] | None = None,
    time_limit: float = 10.0,
) -> Allocation:
    """Minimum-cost configuration with parameter-weighted average bits ``<= avg_bits``.

    Args:
        problem: the instance.
        avg_bits: budget ``ω`` on ``Σ n_l b_l / Σ n_l``. ``ω >= max(bits)`` leaves only the cost (all layers
            at the highest bit for a cost that decreases with bits; cost ties go to more bits);
            ``ω = min(bits)`` forces all layers to the lowest bit.
        max_bops: optional cap on total BOPs (needs ``problem.bops``).
        fixed: ``{layer: bit}`` pins (Algorithm 2's "fix one layer to another bit"); a pin applies to the
            layer's whole tie group.
        time_limit: CBC wall-clock limit in seconds.

    Returns:
        The optimal :class:`Allocation` (raw cost); a feasible but unproven one, with a ``RuntimeWarning``, if
        CBC hits ``time_limit``.

    Raises:
        InfeasibleError: (a ``ValueError``) no configuration satisfies the constraints.
        ValueError: invalid arguments.
        RuntimeError: CBC found no solution within ``time_limit``.
    """
    if not time_limit > 0:
        raise ValueError(f"time_limit={time_limit} must be > 0 seconds")
    omega = _check_budget(avg_bits, problem)
    if max_bops is not None and (problem.bops is None or not (np.isfinite(max_bops) and max_bops > 0)):
        raise ValueError(f"max_bops={max_bops} needs problem.bops (see cost.bops_matrix) and must be finite and > 0")
    grp = _groups(problem)
    allowed = _allowed(problem, grp, fixed)
    total = problem.total_params
    size_cap = omega * total + _SIZE_ATOL
    big = np.iinfo(np.int64).max
    min_size = np.where(allowed, grp.size, big).min(axis=1)
    if int(min_size.sum()) > size_cap:
        lowest = f"{min_size.sum() / total:.6g} (every free layer at the lowest candidate bit)"
        raise InfeasibleError(f"avg_bits={avg_bits} is infeasible with fixed={dict(fixed or {})}: must be >= {lowest}")
    if max_bops is not None and grp.bops is not None:
        min_bops = float(np.where(allowed, grp.bops, np.inf).min(axis=1).sum())
        if min_bops > max_bops * (1 + _BOPS_RTOL):
            raise InfeasibleError(f"max_bops={max_bops} is infeasible: must be >= {min_bops:.6g} (lowest-BOPs bits)")
    # Unconstrained optimum (ties in cost broken towards more bits): optimal whenever it fits the budget.
    masked = np.where(allowed, grp.cost, np.inf)
    best = np.where(masked == masked.min(axis=1, keepdims=True), np.asarray(problem.bits)[None, :], -1).argmax(axis=1)
    if _fits(grp, best, size_cap, max_bops):
        return _allocations(problem, grp, best[:, None])[0]
    # Only the all-lowest configuration fits (e.g. ω = min bit): no solver needed, no float trouble at the bound.
    upgrades = int(min_size.sum()) - min_size[:, None] + grp.size  # sizes of "one group above its lowest"
    if not np.any(allowed & (grp.size > min_size[:, None]) & (upgrades <= size_cap)):
        lowest = np.argmin(np.where(allowed, grp.size, big), axis=1)
        if not _fits(grp, lowest, size_cap, max_bops):
            raise InfeasibleError(f"avg_bits={avg_bits} with max_bops={max_bops} is infeasible")
        return _allocations(problem, grp, lowest[:, None])[0]
    choice = _solve_cbc(grp, allowed, omega, total, max_bops, time_limit)
    return _allocations(problem, grp, choice[:, None])[0]


def _solve_cbc(
    grp: _Groups, allowed: np.ndarray, omega: float, total: int, max_bops: float | None, limit: float
) -> np.ndarray:
    G, K = allowed.shape
    size_cap = omega * total + _SIZE_ATOL
    # Shift each row by its minimum (a constant) and scale so Σ_l (smallest positive entry of row l) = target.
    c = np.where(allowed, grp.cost, np.inf)
    c = np.where(allowed, c - c.min(axis=1, keepdims=True), 0.0)
    positive = np.where(c > 0, c, np.inf).min(axis=1)
    lower = float(positive[np.isfinite(positive)].sum())
    scale = min(_OBJECTIVE_TARGET / lower if lower > 0 else 1.0, _MAX_COEF / max(float(c.max()), 1e-300))
    obj = c * scale
    import pulp  # the solver is only needed here: importing the training package must not require it

    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    with warnings.catch_warnings():  # PuLP 3.x deprecates direct LpVariable construction and the bundled CBC
        warnings.simplefilter("ignore", DeprecationWarning)
        x = {(g, j): pulp.LpVariable(f"x_{g}_{j}", cat=pulp.LpBinary) for g, j in np.argwhere(allowed).tolist()}
        # No `threads=`: the bundled CBC 2.10.3 with `-threads 1` sometimes deadlocks (futex) until timeLimit.
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, gapRel=0, gapAbs=0, options=[_CBC_INC])
    prob += pulp.lpSum(float(obj[g, j]) * v for (g, j), v in x.items())
    for g in range(G):
        prob += pulp.lpSum(v for (gg, _), v in x.items() if gg == g) == 1, f"one_hot_{g}"
    prob += pulp.lpSum(float(grp.size[g, j]) / total * v for (g, j), v in x.items()) <= omega, "avg_bits"
    if max_bops is not None and grp.bops is not None:
        prob += pulp.lpSum(float(grp.bops[g, j]) / max_bops * v for (g, j), v in x.items()) <= 1.0, "bops"
    for cut in range(20):
        prob.solve(solver)
        status = pulp.LpStatus[prob.status]
        if status == "Infeasible" or prob.sol_status == pulp.LpSolutionInfeasible:
            raise InfeasibleError(f"avg_bits={omega} with max_bops={max_bops} is infeasible (CBC status {status})")
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            raise RuntimeError(f"CBC found no solution within time_limit={limit}s (status {status})")
        if prob.sol_status != pulp.LpSolutionOptimal:
            warnings.warn(f"CBC hit time_limit={limit}s: solution not proven optimal", RuntimeWarning, stacklevel=3)
        val = np.zeros((G, K))
        val[tuple(np.asarray(list(x)).T)] = [v.varValue or 0.0 for v in x.values()]
        if np.any(np.minimum(np.abs(val), np.abs(val - 1)) > 1e-6) or np.any(np.abs(val.sum(axis=1) - 1) > 1e-6):
            raise RuntimeError("CBC returned a non-binary or non-one-hot solution")
        choice = val.argmax(axis=1)
        if _fits(grp, choice, size_cap, max_bops):
            return choice
        # CBC's feasibility tolerance let a configuration slightly over budget through: exclude it, re-solve.
        prob += pulp.lpSum(x[g, int(j)] for g, j in enumerate(choice)) <= G - 1, f"no_good_{cut}"
    raise RuntimeError("CBC kept returning over-budget configurations after 20 no-good cuts")


def _dp_front(grp: _Groups) -> tuple[np.ndarray, np.ndarray]:
    """Exact non-dominated (size, cost) front: ``(sizes (M,), choices (G, M))`` with sizes ascending."""
    sizes, costs = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents, picks = [], []
    for g in range(grp.size.shape[0]):
        # K runs, each sorted by size: a stable sort merges them cheaply (timsort).
        cand_s = (grp.size[g][:, None] + sizes[None, :]).ravel()
        cand_c = (grp.cost[g][:, None] + costs[None, :]).ravel()
        order = np.argsort(cand_s, kind="stable")
        s, c = cand_s[order], cand_c[order]
        # Strictly cheaper than everything no larger; then, among equal sizes, the last kept (= cheapest).
        kept = np.flatnonzero(np.r_[True, c[1:] < np.minimum.accumulate(c)[:-1]])
        sel = kept[np.r_[s[kept][1:] != s[kept][:-1], True]]
        parents.append(order[sel] % sizes.size)
        picks.append(order[sel] // sizes.size)
        sizes, costs = s[sel], c[sel]
    choice = np.empty((len(picks), sizes.size), dtype=np.int64)
    at = np.arange(sizes.size)
    for g in range(len(picks) - 1, -1, -1):
        choice[g] = picks[g][at]
        at = parents[g][at]
    return sizes, choice


def pareto_front_dp(problem: BitAllocationProblem) -> list[Allocation]:
    """Exact Pareto front over (average bits, cost) by a Nemhauser–Ullmann merge of layers (ties honoured).

    No configuration has both ``<=`` average bits and ``<=`` cost, one strictly, than a returned one (of equal
    (size, cost) pairs one is kept). BOPs are ignored. Returns allocations by ascending ``avg_bits``, strictly
    decreasing cost.
    """
    grp = _groups(problem)
    return _allocations(problem, grp, _dp_front(grp)[1])


def pareto_front(
    problem: BitAllocationProblem,
    budgets: Sequence[float] | None = None,
    *,
    method: str = "dp",
    max_bops: float | None = None,
    time_limit: float = 10.0,
) -> list[Allocation]:
    """Best allocation at each budget ``ω`` (average bits ``<= ω``), deduplicated and sorted by ``avg_bits``.

    Args:
        problem: the instance.
        budgets: average-bit budgets; default ``min(bits), min(bits) + 0.25, ..., max(bits)``.
        method: ``"dp"`` (lookup in :func:`pareto_front_dp`; exact, fast) or ``"ilp"`` (:func:`solve_ilp` per
            budget; needed for ``max_bops``).
        max_bops: BOPs cap for every budget (``method="ilp"`` only).
        time_limit: CBC limit per solve.
    """
    if method not in ("dp", "ilp"):
        raise ValueError(f"method={method!r} is unknown; allowed: 'dp', 'ilp'")
    if method == "dp" and max_bops is not None:
        raise ValueError("method='dp' does not support max_bops; use method='ilp'")
    grid = np.arange(min(problem.bits), max(problem.bits) + 1e-9, 0.25)
    omegas = [_check_budget(w, problem) for w in (grid if budgets is None else budgets)]
    if not omegas:
        raise ValueError("budgets is empty")
    if method == "ilp":
        found = [solve_ilp(problem, w, max_bops=max_bops, time_limit=time_limit) for w in omegas]
    else:
        sizes, choice = _dp_front(grp := _groups(problem))
        caps = np.asarray(omegas) * problem.total_params + _SIZE_ATOL
        at = np.unique(np.searchsorted(sizes, caps, side="right") - 1)
        found = _allocations(problem, grp, choice[:, at])
    unique = {tuple(a.config.values()): a for a in found}
    return sorted(unique.values(), key=lambda a: (a.avg_bits, a.cost))


def algorithm2_enumeration(
    problem: BitAllocationProblem,
    avg_bits: float,
    *,
    max_bops: float | None = None,
    fixed: Mapping[str, int] | None = None,
    time_limit: float = 10.0,
) -> list[Allocation]:
    """The paper's Algorithm 2 candidate list: the optimum plus "layer ``l`` fixed to bit ``b``" re-solves.

    For every layer and every candidate bit other than the optimum's, the ILP is re-solved with that layer
    pinned (its tie group with it); infeasible pins are skipped; layers already in ``fixed`` are not re-pinned.

    Returns:
        Distinct allocations, the unconstrained optimum first, then by ascending cost.
    """
    base = solve_ilp(problem, avg_bits, max_bops=max_bops, fixed=fixed, time_limit=time_limit)
    grp = _groups(problem)
    found = {tuple(base.config.values()): base}
    seen: set[tuple[int, int]] = set()
    for i, name in enumerate(problem.layers):
        for bit in problem.bits:
            key = (int(grp.of_layer[i]), bit)
            if (fixed and name in fixed) or bit == base.config[name] or key in seen:
                continue
            seen.add(key)  # pinning one layer pins its whole tie group: solve each (group, bit) once
            try:
                pins = {**(fixed or {}), name: bit}
                alloc = solve_ilp(problem, avg_bits, max_bops=max_bops, fixed=pins, time_limit=time_limit)
            except InfeasibleError:
                continue
            found.setdefault(tuple(alloc.config.values()), alloc)
    rest = sorted((a for a in found.values() if a is not base), key=lambda a: a.cost)
    return [base, *rest]
