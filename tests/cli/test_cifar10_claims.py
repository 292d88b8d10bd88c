"""The CIFAR-10 claims table's paired statistics (experiments/cifar10/table.py) against scipy's paired t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from experiments.cifar10.table import paired_stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_stats_match_scipy_ttest_rel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(60.0, 1.0, size=5)
    b = a - rng.normal(0.3, 0.5, size=5)
    mean, std, p = paired_stats(list(a - b))
    ref = stats.ttest_rel(a, b)
    assert mean == pytest.approx(float(np.mean(a - b)))
    assert std == pytest.approx(float(np.std(a - b, ddof=1)))
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9)


def test_paired_stats_textbook_value_and_edge_cases() -> None:
    mean, std, p = paired_stats([1.0, 2.0, 3.0, 4.0, 5.0])  # t = 3 / (sqrt(2.5) / sqrt(5)) = 4.243, df 4
    assert (mean, std) == (3.0, pytest.approx(math.sqrt(2.5)))
    assert p == pytest.approx(0.01324, abs=5e-5)
    assert paired_stats([0.7])[2] is None
    assert paired_stats([0.5, 0.5])[2] == 0.0
