"""stats.py against known answers: Student's t quantiles from tables, the sign-flip p by enumeration
by hand, the detectable difference from its formula, and the flatness measures at their extremes."""

import math

import numpy as np
import pytest

import stats as S


@pytest.mark.parametrize("q, df, table", [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824),
                                          (0.975, 7, 2.3646), (0.975, 30, 2.0423), (0.8, 2, 1.0607),
                                          (0.8, 7, 0.8960), (0.5, 5, 0.0), (0.025, 4, -2.7764)])
def test_t_quantiles_match_the_tables(q, df, table):
    assert S.t_ppf(q, df) == pytest.approx(table, abs=1e-4)


def test_t_cdf_of_one_degree_is_the_cauchy_cdf():
    for x in (-3.0, -0.5, 0.0, 1.0, 7.0):
        assert S.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)


def test_sign_flip_p_by_hand():
    # 3 positive differences: only the all-positive and all-negative of 8 sign patterns reach |mean| = 2
    assert S.sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)
    # [3, -1]: patterns give means 1, 2, -2, -1; |mean| >= 1 for all four
    assert S.sign_flip_p([3, -1]) == 1.0
    # 8 positive differences: the smallest p 8 seeds can give, 2/256
    assert S.sign_flip_p([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(2 / 256)
    # [4, 1, 1, -1]: |mean| >= 1.25 needs sum >= 5 in absolute value: +4 with at least two of the
    # three unit terms positive (4 patterns: 4+1+1-1, 4+1-1+1, 4-1+1+1, 4+1+1+1) and their mirrors
    assert S.sign_flip_p([4, 1, 1, -1]) == pytest.approx(8 / 16)


def test_paired_interval_and_detectable_difference_known_values():
    p = S.paired([1, 2, 3, 4])  # mean 2.5, sd sqrt(5/3), t(0.975, 3) = 3.18245
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert p["mean"] == 2.5 and p["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert p["ci95"] == pytest.approx((2.5 - half, 2.5 + half), abs=1e-6)
    assert p["p_sign_flip"] == pytest.approx(2 / 16)
    # (t(0.975, 3) + t(0.8, 3)) * sd / sqrt(n), t(0.8, 3) = 0.97847
    assert p["detectable"] == pytest.approx((3.182446 + 0.978472) * math.sqrt(5 / 3) / 2, abs=1e-5)
    # the figures: sd 3.7 over 3 seeds detects ~11.5 points, over 8 seeds ~4.3
    assert S.detectable_difference(3.7, 3) == pytest.approx(11.46, abs=0.01)
    assert S.detectable_difference(3.7, 8) == pytest.approx(4.27, abs=0.01)
    one = S.paired([2.0])
    assert one["n"] == 1 and math.isnan(one["ci95"][0]) and math.isnan(one["detectable"])
    assert math.isnan(one["p_sign_flip"])  # one seed: no test at all, not p = 1
    with pytest.raises(ValueError, match="no differences"):
        S.paired([])


def test_mean_interval():
    m, lo, hi = S.mean_interval([10, 12, 14])
    half = 4.302653 * 2 / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((12, 12 - half, 12 + half), abs=1e-5)
    assert S.mean_interval([5.0]) == (5.0, 5.0, 5.0)


def test_effective_layers_and_gini_at_their_extremes():
    assert S.effective_layers([3, 3, 3, 3]) == pytest.approx(1.0)
    assert S.effective_layers([0, 0, 0, 10]) == pytest.approx(1 / 4)
    assert S.effective_layers([1, 1, 0, 0]) == pytest.approx(0.5)  # two of four layers
    assert S.gini([2, 2, 2, 2, 2]) == 0.0
    assert S.gini([0, 0, 0, 0, 7]) == pytest.approx(4 / 5)
    # [1, 3]: mean |difference| over the 4 ordered pairs = (0 + 2 + 2 + 0) / 4 = 1, / (2 * 2) = 0.25
    assert S.gini([1, 3]) == pytest.approx(0.25)
    # independent of the layer count: 8 and 28 flat layers, or a profile and its copy twice over
    rng = np.random.default_rng(0)
    x = rng.random(8)
    assert S.effective_layers(np.r_[x, x]) == pytest.approx(S.effective_layers(x))
    assert S.gini(np.r_[x, x]) == pytest.approx(S.gini(x))
