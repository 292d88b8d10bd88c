"""FQT study: the table, the plot and the paper's claims, computed from the cached arm results.

    uv run python -m experiments.fqt.claims        # reads experiments/results/fqt/*.json

Writes experiments/results/fqt_claims.json, experiments/results/fqt_study.png and the block between
``<!-- fqt:start -->`` and ``<!-- fqt:end -->`` in experiments/README.md. A claim is judged on the accuracy
difference and its standard error (two independent binomial proportions on the same 1,000 validation images, so the
SE is conservative): "holds" when the difference has the paper's sign and |diff| > 2 SE, "direction only" when the
sign matches within noise, "does not hold" otherwise. Pairs of a model whose 1-bit QAT ceiling (Adam) is within
3 SE of chance (20 %, five classes) are left out of the claims: nothing there learned, so no comparison can show.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
README = ROOT / "experiments" / "README.md"
START, END = "<!-- fqt:start -->", "<!-- fqt:end -->"
LABELS = {"qat": "1-bit QAT (exact gradients)", "psq1": "PSQ 1-bit", "agp": "AGP 4-bit keep 25 % + SCQ",
          "topk": "biased top-K 4-bit 25 %", "bhq1": "BHQ 1-bit", "psq8": "PSQ 8-bit (INT8 FQT)"}  # fmt: skip
OPT_LABELS = {"adam": "Adam", "sgdm": "SGD+momentum", "sgd": "SGD"}


def load() -> dict[str, dict[str, Any]]:
    """Every cached arm result, by arm name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / "fqt").glob("*.json"))}


def _se(r: dict[str, Any]) -> float:
    p, n = r["val_acc"], r["val_images"]
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def _diff(arms: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    if a not in arms or b not in arms or arms[a]["val_acc"] is None or arms[b]["val_acc"] is None:
        return None
    d = 100 * (arms[a]["val_acc"] - arms[b]["val_acc"])
    se = 100 * math.hypot(_se(arms[a]), _se(arms[b]))
    return {"a": a, "b": b, "diff_pt": round(d, 2), "se_pt": round(se, 2)}


def _verdict(diffs: list[dict[str, Any]], paper_sign: int) -> str:
    if not diffs:
        return "not measured"
    mean = statistics.fmean(d["diff_pt"] for d in diffs)
    se = math.sqrt(sum(d["se_pt"] ** 2 for d in diffs)) / len(diffs)
    if mean * paper_sign > 2 * se:
        return "holds"
    return "direction only (within noise)" if mean * paper_sign > 0 else "does not hold"


CHANCE = 0.2


def informative(arms: dict[str, Any], model: str) -> bool:
    """Whether ``model``'s 1-bit QAT arm (Adam) beats chance by more than 3 SE."""
    ceiling = arms.get(f"{model}_qat_adam")
    return bool(ceiling and ceiling["val_acc"] is not None and ceiling["val_acc"] - CHANCE > 3 * _se(ceiling))


def claims(arms: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims and our comparisons, each with its pairs, mean difference and verdict."""
    pairs = [(m, o) for m in ("r20", "mbv2") if informative(arms, m) for o in OPT_LABELS]
    spec = [
        ("AGP+SCQ vs PSQ at 1 bit (paper: about +6 pt)", "agp", "psq1", +1, 6.0),
        ("1-bit FQT (AGP) vs 1-bit QAT (paper: about -5 pt)", "agp", "qat", -1, -5.0),
        ("biased top-K vs unbiased AGP (same bits and keep)", "topk", "agp", -1, None),
        ("BHQ vs PSQ at 1 bit, accuracy (StatQuant: BHQ has the lower variance)", "bhq1", "psq1", +1, None),
        ("INT8 FQT (PSQ 8-bit) vs 1-bit QAT (StatQuant: near-lossless)", "psq8", "qat", -1, 0.0),
    ]
    out = []
    for title, a, b, sign, paper in spec:
        diffs = [d for m, o in pairs if (d := _diff(arms, f"{m}_{a}_{o}", f"{m}_{b}_{o}")) is not None]
        mean = round(statistics.fmean(d["diff_pt"] for d in diffs), 2) if diffs else None
        verdict = _verdict(diffs, sign)
        if paper == 0.0 and diffs:  # "near-lossless": holds when the drop is within 2 SE
            se = math.sqrt(sum(d["se_pt"] ** 2 for d in diffs)) / len(diffs)
            verdict = "holds" if abs(mean or 0.0) <= 2 * se else "does not hold"
        out.append({"claim": title, "paper_pt": paper, "mean_diff_pt": mean, "pairs": diffs, "verdict": verdict})
    for method in ("qat", "agp", "psq1"):
        accs = {o: round(100 * arms[f"r20_{method}_{o}"]["val_acc"], 2) for o in OPT_LABELS
                if arms.get(f"r20_{method}_{o}", {}).get("val_acc") is not None}  # fmt: skip
        best = f"best: {OPT_LABELS[max(accs, key=accs.__getitem__)]}" if accs else "not measured"
        out.append({"claim": f"optimizers, {LABELS[method]} (cifar_resnet20): accuracy per optimizer", "accs": accs,
                    "verdict": best})  # fmt: skip
    gaps: dict[str, float] = {}
    for o in OPT_LABELS:
        ds = [d["diff_pt"] for m in ("agp", "psq1") if (d := _diff(arms, f"r20_{m}_{o}", f"r20_qat_{o}")) is not None]
        if ds:
            gaps[o] = round(statistics.fmean(ds), 2)
    out.append({"claim": "Adam tolerates 1-bit gradients best (FQT − QAT gap per optimizer, mean over AGP and "
                         "PSQ-1, cifar_resnet20)", "gaps_pt": gaps,
                "verdict": ("holds" if gaps and max(gaps, key=gaps.__getitem__) == "adam"
                            else "does not hold" if gaps else "not measured")})  # fmt: skip
    return out


def _layer_var(r: dict[str, Any]) -> tuple[float, float]:
    values = list(r["gradient"]["rel_var"].values())
    return statistics.median(values), max(values)


def table(arms: dict[str, Any]) -> list[str]:
    """Markdown rows of the per-arm table."""
    qat_mem = {r["model"]: r["memory"]["extra_mib"] for r in arms.values() if r["method"] == "qat"}
    rows = ["| model | gradients | optimizer | val acc (± SE) | avg grad bits | groups kept | rel. grad var, median / "
            "max layer | step extra memory | fit |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in arms.values():
        g = r["gradient"]
        med, mx = _layer_var(r)
        bits = "32 (FP)" if r["method"] == "qat" else f"{g['average_bits']:.2f}"
        kept = f"{100 * g['kept_fraction']:.1f} %"
        mem = r["memory"]["extra_mib"]
        rel = f" ({mem / qat_mem[r['model']]:.2f}x QAT)" if r["model"] in qat_mem else ""
        acc = (
            "diverged (NaN loss, step 1)"
            if r["val_acc"] is None
            else f"{100 * r['val_acc']:.1f} % ± {100 * _se(r):.1f}"
        )
        rows.append(f"| {r['model']} | {LABELS[r['method']]} | {OPT_LABELS[r['optimizer']]} | "
                    f"{acc} | {bits} | {kept} | {med:.3g} / {mx:.3g} | "
                    f"{mem:.0f} MiB{rel} | {r['fit_s'] / 60:.1f} min |")  # fmt: skip
    return rows


def plot(arms: dict[str, Any], path: Path) -> None:
    """Accuracy per arm (left) and per-layer relative gradient variance of the Adam cifar_resnet20 arms (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    names = [n for n, r in arms.items() if r["val_acc"] is not None]
    accs = [100 * arms[n]["val_acc"] for n in names]
    errs = [100 * _se(arms[n]) for n in names]
    colors = ["tab:gray" if arms[n]["method"] == "qat" else "tab:blue" for n in names]
    ax1.barh(range(len(names)), accs, xerr=errs, color=colors)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.axvline(20, color="k", ls=":", lw=1, label="chance (5 classes)")
    ax1.set_xlabel("target-task val accuracy, % (± binomial SE)")
    ax1.set_title("1-bit fine-tuning, CIFAR-10 classes 5-9")
    ax1.legend(fontsize=8)
    for r in arms.values():
        if r["model"] == "r20" and r["optimizer"] == "adam" and r["method"] != "qat":
            v = r["gradient"]["rel_var"]
            ax2.plot(range(len(v)), list(v.values()), marker=".", label=LABELS[r["method"]])
    ax2.set_yscale("log")
    ax2.set_xlabel("quantized layer (cifar_resnet20, input to output)")
    ax2.set_ylabel("E||g_hat - g||^2 / ||g||^2 (weight gradient)")
    ax2.set_title("Relative gradient variance vs exact, start model, 128 images")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _block(arms: dict[str, Any], result: list[dict[str, Any]]) -> str:
    lines = [START, "", *table(arms), "", "| claim | measured (mean diff, pt) | paper | verdict |", "|---|---|---|---|"]
    for c in result:
        if "pairs" in c:
            pairs = "; ".join(f"{d['a']} − {d['b']}: {d['diff_pt']:+.1f} ± {d['se_pt']:.1f}" for d in c["pairs"])
            measured = f"{c['mean_diff_pt']:+.1f} ({pairs})" if c["pairs"] else "—"
        else:
            measured = json.dumps(c.get("accs") or c.get("gaps_pt"))
        paper = "—" if c.get("paper_pt") is None else f"{c['paper_pt']:+.0f}"
        lines.append(f"| {c['claim']} | {measured} | {paper} | {c['verdict']} |")
    lines += ["", "![FQT study](results/fqt_study.png)", "", END]
    return "\n".join(lines)


def main() -> None:
    """Compute and write everything; print the block."""
    arms = load()
    if not arms:
        raise SystemExit("no results under experiments/results/fqt/: run python -m experiments.fqt.study first")
    result = claims(arms)
    (RESULTS / "fqt_claims.json").write_text(json.dumps(result, indent=2))
    plot(arms, RESULTS / "fqt_study.png")
    block = _block(arms, result)
    text = README.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Fully quantized training study (`experiments/fqt/`)\n\n" + block + "\n"
    README.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
