"""report.py: the paired statistics against known values."""

import numpy as np
import pytest

import report as R


def test_mcnemar_exact_known_values():
    assert R.mcnemar_exact(0, 0) == 1.0
    assert R.mcnemar_exact(5, 5) == 1.0
    assert R.mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 x 0.5^6
    assert R.mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    # the study's 74.5% vs 70.0% on 200 problems: 9 problems apart. With 9 vs 0 disagreements it is
    # distinguishable; with 29 vs 20 (the same gap, more disagreement) it is not.
    assert R.mcnemar_exact(9, 0) < 0.01 and R.mcnemar_exact(29, 20) > 0.2


def test_paired_bootstrap_brackets_the_difference():
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.75).astype(float)
    b = a.copy()
    b[:60] = 0  # b loses up to 60 problems a solved
    lo, hi = R.paired_bootstrap(a, b)
    d = a.mean() - b.mean()
    assert lo < d < hi and lo > 0
    lo, hi = R.paired_bootstrap(a, a)
    assert lo == hi == 0.0
