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
    from experiments.cifar10.study import study_arms

    rows = []
    for arm in study_arms():
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


def _paired(ours: list[str], base: list[str], bits: str) -> tuple[str, float | None, float | None]:
    """Seed means over the seeds (list positions) where both arms are cached: label, ours, baseline."""
    pairs = [(a, b) for a, b in zip(ours, base, strict=True) if _load(a) is not None and _load(b) is not None]
    label = f"mean of {len(pairs)} paired seed{'s' if len(pairs) != 1 else ''}"
    if not pairs:
        return label, None, None
    return label, _acc([a for a, _ in pairs], bits), _acc([b for _, b in pairs], bits)


def _front(name: str, budget: float) -> float | None:
    """Accuracy (%) of the SubNet searched at ``budget`` average bits in a mixed arm."""
    r = _load(name)
    if r is None or "pareto" not in r:
        return None
    rows = [p for p in r["pareto"] if abs(p["avg_bits"] - budget) <= 0.05]
    return 100 * rows[0]["acc"] if rows else None


def _claim(what: str, a: float | None, b: float | None, target: float | None, strict: bool = False) -> str:
    """One row: ``a − b`` against ``a − b ≥ target`` (``>`` if ``strict``; no target: reported only)."""
    shown = "-" if target is None else f"{'>' if strict else '≥'} {target:+.1f}"
    if a is None or b is None:
        return f"| {what} | {_pct(a)} | {_pct(b)} | | {shown} | pending |"
    d = a - b
    if target is None:
        verdict = "(reported)"
    else:
        verdict = "holds" if (d > target if strict else d >= target) else "**does not hold**"
    return f"| {what} | {a:.2f} | {b:.2f} | {d:+.2f} | {shown} | {verdict} |"


def _pct(v: float | None) -> str:
    return "pending" if v is None else f"{v:.2f}"


ALRS_SEEDS = (0, 1, 2, 3, 4)


def paired_stats(diffs: list[float]) -> tuple[float, float, float | None]:
    """Mean and sample std of paired differences and the two-sided paired t-test p-value (``None`` below 2 pairs)."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if d.size < 2:
        return mean, float("nan"), None
    std = float(d.std(ddof=1))
    if std == 0.0:
        return mean, std, 0.0 if mean != 0.0 else 1.0
    t = mean / (std / np.sqrt(d.size))
    return mean, std, float(2 * stats.t.sf(abs(t), df=d.size - 1))


def _alrs_paired_row() -> str:
    """ALRS − no ALRS at w2a2 over every seed where both arms are cached: mean ± std, paired t-test."""
    diffs, a_vals, b_vals = [], [], []
    for seed in ALRS_SEEDS:
        a, b = _acc([f"dr_8642_alrs_s{seed}"], "w2a2"), _acc([f"dr_8642_noalrs_s{seed}"], "w2a2")
        if a is not None and b is not None:
            diffs.append(a - b)
            a_vals.append(a)
            b_vals.append(b)
    what = f"ALRS vs no ALRS, w2a2, {len(diffs)} paired seeds: mean ± std of the difference, paired t-test"
    if not diffs:
        return f"| {what} | pending | pending | | - | pending |"
    mean, std, p = paired_stats(diffs)
    a, b = sum(a_vals) / len(a_vals), sum(b_vals) / len(b_vals)
    p_txt = "n/a" if p is None else f"{p:.2f}"
    verdict = "(reported)" if p is None else ("differs (p < 0.05)" if p < 0.05 else "no detectable effect")
    return f"| {what} | {a:.2f} | {b:.2f} | {mean:+.2f} ± {std:.2f} (p = {p_txt}) | - | {verdict} |"


def _claims() -> list[str]:
    dr = ["dr_8642_alrs_s0", "dr_8642_alrs_s1"]
    rows = ["| claim | ours | baseline | difference (pt) | target | verdict |", "|---|---|---|---|---|---|"]
    for b, tol in (("w8a8", -0.5), ("w6a6", -0.5), ("w4a4", -0.5), ("w2a2", -2.0)):
        rows.append(_claim(f"DR {{8,6,4,2}} {b} ({_seeds(dr)}) vs LSQ trained at {b[1]} bits alone (1 seed)",
                           _acc(dr, b), _acc([f"lsq_w{b[1]}"], b), tol))  # fmt: skip
    for seed in (0, 1):
        rows.append(_claim(f"DR vs floor nesting, w2a2, seed {seed}", _acc([dr[seed]], "w2a2"),
                           _acc([f"floor_8642_s{seed}"], "w2a2"), 0.0, strict=True))  # fmt: skip
    label, a, b = _paired(dr, ["floor_8642_s0", "floor_8642_s1"], "w2a2")
    rows.append(_claim(f"DR vs floor nesting, w2a2, {label}", a, b, 0.0, strict=True))
    dr_all = [f"dr_8642_alrs_s{s}" for s in ALRS_SEEDS]
    for b, tol in (("w8a8", -0.5), ("w4a4", -0.5), ("w2a2", -2.0)):
        rows.append(_claim(f"DR vs LSQ at equal compute, {b}: DR 5 epochs x 4 bits ({_seeds(dr_all)}) vs LSQ {b[1]} "
                           "bits alone for 20 epochs (1 seed)", _acc(dr_all, b), _acc([f"lsq_w{b[1]}_e20"], b),
                           tol))  # fmt: skip
    for seed in ALRS_SEEDS:
        rows.append(_claim(f"ALRS vs no ALRS, w2a2, seed {seed}", _acc([f"dr_8642_alrs_s{seed}"], "w2a2"),
                           _acc([f"dr_8642_noalrs_s{seed}"], "w2a2"), None))  # fmt: skip
    rows.append(_alrs_paired_row())
    for budget in (3.0, 4.0):
        rows.append(_claim(f"HASB vs uniform sampling, SubNet at {budget:.0f} average bits",
                           _front("mixed_hasb", budget), _front("mixed_uniform", budget), None))  # fmt: skip
    return rows


FIGURE = RESULTS / "cifar10_study.png"
_GROUPS = {
    "LSQ, one model per bit": ["lsq_w8", "lsq_w6", "lsq_w4", "lsq_w2"],
    "LSQ, one model per bit, 20 epochs (equal compute)": ["lsq_w8_e20", "lsq_w4_e20", "lsq_w2_e20"],
    "DR {8,6,4,2} + ALRS": [f"dr_8642_alrs_s{s}" for s in (0, 1, 2, 3, 4)],
    "DR {8,6,4,2}, no ALRS": [f"dr_8642_noalrs_s{s}" for s in (0, 1, 2, 3, 4)],
    "floor nesting {8,6,4,2}": ["floor_8642_s0", "floor_8642_s1"],
    "DR {4,3,2}": ["dr_432"],
}


def plot() -> Path:
    """Per-bit accuracy of every uniform-precision arm (seed means, seeds as dots) and the mixed-precision fronts."""
    from lightning_dbq.search.figures import pyplot, save_figure

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    bits = ["w8a8", "w6a6", "w4a4", "w3a3", "w2a2"]
    width = 0.8 / len(_GROUPS)
    for i, (label, arms) in enumerate(_GROUPS.items()):
        for j, b in enumerate(bits):
            vals = [100 * r["val"][b]["acc"] for r in map(_load, arms) if r is not None and b in r["val"]]
            if not vals:
                continue
            x = j + (i - (len(_GROUPS) - 1) / 2) * width
            ax.bar(x, sum(vals) / len(vals), width, color=f"C{i}", label=label)
            ax.plot([x] * len(vals), vals, "k.", ms=3)
    fp = _load("fp32")
    if fp is not None:
        ax.axhline(100 * fp["val"]["fp32"]["acc"], color="gray", ls="--", lw=1, label="FP32")
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="lower left")
    ax.set_xticks(range(len(bits)), bits)
    ax.set_ylim(40, 75)
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("CIFAR-10, cifar_resnet20: uniform precision (bars: seed mean, dots: seeds)")
    for i, name in enumerate(("mixed_hasb", "mixed_uniform")):
        r = _load(name)
        if r is None or "pareto" not in r:
            continue
        pts = sorted((p["avg_bits"], 100 * p["acc"]) for p in r["pareto"])
        ax2.plot(*zip(*pts, strict=True), "o-", color=f"C{i + 5}", label=name.replace("mixed_", ""))
    ax2.set_xlabel("average weight bits")
    ax2.set_ylabel("val accuracy (%)")
    ax2.set_title("mixed-precision SubNets")
    if ax2.lines:
        ax2.legend(fontsize=8)
    return save_figure(fig, FIGURE)


def main() -> None:
    """Replace the block between ``<!-- cifar10:start -->`` and ``<!-- cifar10:end -->``."""
    header = ["| arm | seed | " + " | ".join(COLUMNS) + " | minutes | kernel |", "|---" * (len(COLUMNS) + 4) + "|"]
    block = "\n".join(["<!-- cifar10:start -->", "Validation accuracy (%), 5,000-image held-out split:", "",
                       *header, *_rows(), "", "The paper's claims, computed from the rows above:", "", *_claims(),
                       "", f"![CIFAR-10 study](results/{FIGURE.name})", "<!-- cifar10:end -->"])  # fmt: skip
    text = README.read_text()
    pattern = re.compile(r"<!-- cifar10:start -->.*?<!-- cifar10:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.replace(
        "## Performance benchmarks", block + "\n\n## Performance benchmarks")  # fmt: skip
    README.write_text(text)
    plot()
    print(block)


if __name__ == "__main__":
    main()
