"""Write the CIFAR-10 study tables into experiments/README.md from the cached JSON results.

uv run python -m experiments.cifar10.table

Two tables: every arm's per-bit validation accuracy, and the paper's claims computed from those numbers (a claim
whose arms are not all cached is shown as pending). Seeds are averaged where an arm has two.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
README = ROOT / "experiments" / "README.md"
COLUMNS = ("fp32", "w8a8", "w6a6", "w4a4", "w3a3", "w2a2")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"cifar10_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _kernel(r: dict[str, Any]) -> str:
    if r["arm"] == "fp32":
        return "-"
    return str(r.get("kernel", "eager"))  # results written before the field existed ran the composite (eager) kernels


def _rows() -> list[str]:
    from experiments.cifar10.study import _arms

    rows = []
    for arm in _arms():
        r = _load(arm.name)
        if r is None:
            rows.append(f"| {arm.name} | {arm.seed} | " + " | ".join("pending" for _ in COLUMNS) + " | | |")
            continue
        cells = [f"{100 * r['val'][c]['acc']:.2f}" if c in r["val"] else "" for c in COLUMNS]
        rows.append(
            f"| {arm.name} | {arm.seed} | " + " | ".join(cells) + f" | {r['elapsed_s'] / 60:.1f} | {_kernel(r)} |"
        )
    return rows


def _acc(arms: list[str], bits: str) -> float | None:
    """Mean validation accuracy (%) at ``bits`` over the cached ``arms`` (None if none is cached)."""
    vals = [100 * r["val"][bits]["acc"] for r in map(_load, arms) if r is not None and bits in r["val"]]
    return sum(vals) / len(vals) if vals else None


def _seeds(*arm_lists: list[str]) -> str:
    n = min(sum(_load(a) is not None for a in arms) for arms in arm_lists)
    return f"mean of {n} seed{'s' if n != 1 else ''}"


def _front(name: str, budget: float) -> float | None:
    """Accuracy (%) of the SubNet searched at ``budget`` average bits in a mixed arm."""
    r = _load(name)
    if r is None or "pareto" not in r:
        return None
    rows = [p for p in r["pareto"] if abs(p["avg_bits"] - budget) <= 0.05]
    return 100 * rows[0]["acc"] if rows else None


def _claim(what: str, a: float | None, b: float | None, target: float | None, strict: bool = False) -> str:
    """One row: ``a − b`` against ``a − b ≥ target`` (``>`` if ``strict``; no target: reported only)."""
    if a is None or b is None:
        return f"| {what} | pending | pending | | {'' if target is None else target} | pending |"
    d = a - b
    if target is None:
        verdict, shown = "(reported)", "-"
    else:
        ok = d > target if strict else d >= target
        verdict, shown = ("holds" if ok else "**does not hold**"), f"{'>' if strict else '≥'} {target:+.1f}"
    return f"| {what} | {a:.2f} | {b:.2f} | {d:+.2f} | {shown} | {verdict} |"


def _claims() -> list[str]:
    dr = ["dr_8642_alrs_s0", "dr_8642_alrs_s1"]
    rows = ["| claim | ours | baseline | difference (pt) | target | verdict |", "|---|---|---|---|---|---|"]
    for b, tol in (("w8a8", -0.5), ("w6a6", -0.5), ("w4a4", -0.5), ("w2a2", -2.0)):
        rows.append(_claim(f"DR {{8,6,4,2}} {b} ({_seeds(dr)}) vs LSQ trained at {b[1]} bits alone (1 seed)",
                           _acc(dr, b), _acc([f"lsq_w{b[1]}"], b), tol))  # fmt: skip
    for seed in (0, 1):
        rows.append(_claim(f"DR vs floor nesting, w2a2, seed {seed}", _acc([dr[seed]], "w2a2"),
                           _acc([f"floor_8642_s{seed}"], "w2a2"), 0.0, strict=True))  # fmt: skip
    floor = ["floor_8642_s0", "floor_8642_s1"]
    rows.append(_claim(f"DR vs floor nesting, w2a2, {_seeds(dr, floor)}", _acc(dr, "w2a2"),
                       _acc(floor, "w2a2"), 0.0, strict=True))  # fmt: skip
    for seed in (0, 1):
        rows.append(_claim(f"ALRS vs no ALRS, w2a2, seed {seed}", _acc([dr[seed]], "w2a2"),
                           _acc([f"dr_8642_noalrs_s{seed}"], "w2a2"), None))  # fmt: skip
    noalrs = ["dr_8642_noalrs_s0", "dr_8642_noalrs_s1"]
    rows.append(_claim(f"ALRS vs no ALRS, w2a2, {_seeds(dr, noalrs)}", _acc(dr, "w2a2"), _acc(noalrs, "w2a2"), None))
    for budget in (3.0, 4.0):
        rows.append(_claim(f"HASB vs uniform sampling, SubNet at {budget:.0f} average bits",
                           _front("mixed_hasb", budget), _front("mixed_uniform", budget), None))  # fmt: skip
    return rows


def main() -> None:
    """Replace the block between ``<!-- cifar10:start -->`` and ``<!-- cifar10:end -->``."""
    header = ["| arm | seed | " + " | ".join(COLUMNS) + " | minutes | kernel |", "|---" * (len(COLUMNS) + 4) + "|"]
    block = "\n".join(["<!-- cifar10:start -->", "Validation accuracy (%), 5,000-image held-out split:", "",
                       *header, *_rows(), "", "The paper's claims, computed from the rows above:", "", *_claims(),
                       "<!-- cifar10:end -->"])  # fmt: skip
    text = README.read_text()
    pattern = re.compile(r"<!-- cifar10:start -->.*?<!-- cifar10:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.replace(
        "## Performance benchmarks", block + "\n\n## Performance benchmarks")  # fmt: skip
    README.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
