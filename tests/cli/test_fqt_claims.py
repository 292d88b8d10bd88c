"""The FQT study's claim verdicts (experiments/fqt/claims.py) on synthetic arm results."""

from __future__ import annotations

from typing import Any

import pytest

from experiments.fqt.claims import claims


def _arm(model: str, method: str, optimizer: str, acc: float | None) -> dict[str, Any]:
    return {"model": model, "method": method, "optimizer": optimizer, "val_acc": acc, "val_images": 1000}


def _verdict(result: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    return next(c for c in result if c["claim"].startswith(prefix))


@pytest.mark.parametrize(
    ("agp", "psq1", "expected"),
    [(0.60, 0.50, "holds"), (0.51, 0.50, "direction only (within noise)"), (0.45, 0.50, "does not hold")],
)
def test_agp_vs_psq_verdict_follows_the_difference_and_its_error(agp: float, psq1: float, expected: str) -> None:
    arms = {"r20_agp_adam": _arm("r20", "agp", "adam", agp), "r20_psq1_adam": _arm("r20", "psq1", "adam", psq1),
            "r20_qat_adam": _arm("r20", "qat", "adam", 0.6)}  # fmt: skip
    c = _verdict(claims(arms), "AGP+SCQ vs PSQ")
    assert c["verdict"] == expected
    assert c["mean_diff_pt"] == pytest.approx(100 * (agp - psq1))


def test_diverged_arms_are_left_out_and_adam_gap_compares_optimizers() -> None:
    arms = {
        "r20_agp_adam": _arm("r20", "agp", "adam", 0.50),
        "r20_qat_adam": _arm("r20", "qat", "adam", 0.52),
        "r20_agp_sgd": _arm("r20", "agp", "sgd", 0.40),
        "r20_qat_sgd": _arm("r20", "qat", "sgd", 0.52),
        "mbv2_agp_adam": _arm("mbv2", "agp", "adam", None),  # diverged
        "mbv2_qat_adam": _arm("mbv2", "qat", "adam", 0.30),
        "mbv2_psq1_adam": _arm("mbv2", "psq1", "adam", 0.25),
    }
    result = claims(arms)
    fqt_vs_qat = _verdict(result, "1-bit FQT (AGP) vs 1-bit QAT")
    assert [p["a"] for p in fqt_vs_qat["pairs"]] == ["r20_agp_adam", "r20_agp_sgd"]  # mbv2 AGP diverged
    psq_pairs = _verdict(result, "AGP+SCQ vs PSQ")["pairs"]
    assert psq_pairs == []  # mbv2 psq1 has no AGP partner; r20 has no psq1
    gap = _verdict(result, "Adam tolerates")
    assert gap["gaps_pt"] == {"adam": pytest.approx(-2.0), "sgd": pytest.approx(-12.0)}
    assert gap["verdict"] == "holds"


def test_a_model_whose_ceiling_is_at_chance_is_left_out() -> None:
    arms = {f"mbv2_{m}_adam": _arm("mbv2", m, "adam", acc) for m, acc in (("qat", 0.21), ("agp", 0.17))}
    assert _verdict(claims(arms), "1-bit FQT (AGP) vs 1-bit QAT")["verdict"] == "not measured"
    arms["mbv2_qat_adam"]["val_acc"] = 0.40
    assert _verdict(claims(arms), "1-bit FQT (AGP) vs 1-bit QAT")["pairs"][0]["a"] == "mbv2_agp_adam"
