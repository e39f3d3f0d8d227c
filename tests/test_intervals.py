"""Wilson's interval against its published value and closed forms; the paired difference
against hand counts of discordant pairs and against McNemar's test, which it inverts."""

import math

import pytest

from nanoseek.train.intervals import Z95, mean_interval, paired_difference, paired_mean_difference, wilson_interval

EPS = 1e-12  # float64 arithmetic of a few operations on numbers of order 1


def test_wilson_interval_values():
    # 40 of 100: (0.3094, 0.4980), the value of scipy.stats.binomtest(40, 100).proportion_ci("wilson")
    lo, hi = wilson_interval(40, 100)
    assert lo == pytest.approx(0.3094012864324589, abs=EPS) and hi == pytest.approx(0.4979974132089382, abs=EPS)
    # none right: [0, z^2 / (n + z^2)]; all right: its mirror image
    n, z2 = 200, Z95 ** 2
    assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)), abs=EPS)
    assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0), abs=EPS)
    # the standard normal's 97.5% quantile
    assert 0.5 * math.erfc(-Z95 / math.sqrt(2)) == pytest.approx(0.975, abs=EPS)


def test_wilson_interval_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 7), (3, 7), (57, 200), (199, 200), (123, 400)]:
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=EPS)


def test_paired_difference_counts_discordant_pairs():
    # 200 problems: 60 right twice, 30 gained, 10 lost, 100 wrong twice
    before = [True] * 60 + [False] * 30 + [True] * 10 + [False] * 100
    after = [True] * 60 + [True] * 30 + [False] * 10 + [False] * 100
    d = paired_difference(before, after)
    assert (d["gains"], d["losses"], d["n"]) == (30, 10, 200) and d["difference"] == pytest.approx(0.1, abs=EPS)
    lo, hi = wilson_interval(30, 40)  # the share of gains among the 40 discordant problems
    assert d["interval"] == pytest.approx((0.2 * (2 * lo - 1), 0.2 * (2 * hi - 1)), abs=EPS)
    assert 0 < d["interval"][0] < 0.1 < d["interval"][1]
    same = paired_difference([True, False], [True, False])
    assert same["difference"] == 0 and same["interval"] == (0.0, 0.0)


def test_paired_interval_excludes_zero_exactly_when_mcnemar_rejects():
    for gains in range(0, 25):
        for losses in range(0, 25):
            if gains + losses == 0:
                continue
            before = [False] * gains + [True] * losses + [True] * 5
            after = [True] * gains + [False] * losses + [True] * 5
            lo, hi = paired_difference(before, after)["interval"]
            mcnemar = (gains - losses) ** 2 / (gains + losses)  # chi-square, 1 degree of freedom
            if abs(mcnemar - Z95 ** 2) > 1e-9:  # on the boundary either answer is a rounding
                assert (lo > 0 or hi < 0) == (mcnemar > Z95 ** 2), (gains, losses)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([True], [True, False])


def test_mean_interval_and_paired_mean_difference_by_hand():
    # scores 0, 0.5, 1, 0.5: mean 0.5, sample variance (0.25 + 0 + 0.25 + 0) / 3 = 1/6
    scores = [0.0, 0.5, 1.0, 0.5]
    half = Z95 * math.sqrt((1 / 6) / 4)
    assert mean_interval(scores) == pytest.approx((0.5 - half, 0.5 + half), abs=EPS)
    assert mean_interval([1.0, 1.0, 0.75])[1] == 1.0  # clipped to [0, 1]
    # differences 0.25, 0.25, -0.25, 0.75: mean 0.25, variance (0 + 0 + 0.25 + 0.25) / 3 = 1/6
    d = paired_mean_difference([0.5, 0.25, 0.75, 0.0], [0.75, 0.5, 0.5, 0.75])
    half = Z95 * math.sqrt((1 / 6) / 4)
    assert d["difference"] == pytest.approx(0.25, abs=EPS) and d["n"] == 4
    assert d["interval"] == pytest.approx((0.25 - half, 0.25 + half), abs=EPS)
    with pytest.raises(ValueError, match="same problems"):
        paired_mean_difference([0.5], [0.5, 1.0])
