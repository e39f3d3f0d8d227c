"""95% intervals for held-out accuracies, so that a report can say whether a change is noise.

    wilson_interval(k, n)            one accuracy: k right of n problems. Wilson's score
                                     interval (Wilson 1927), which keeps its coverage near 0
                                     and 1 where the normal approximation p +- z*sqrt(p(1-p)/n)
                                     does not (Brown, Cai & DasGupta 2001).
    paired_difference(before, after) the change of accuracy between two models answering the
                                     *same* problems. Only the discordant problems carry
                                     information (right before and wrong after, or the
                                     reverse); given their number m, the gains g are
                                     Binomial(m, pi) and the difference is (m / n)(2 pi - 1).
                                     Wilson's interval for pi, mapped through that line, is
                                     the interval of the difference: it excludes 0 exactly
                                     when the score (McNemar) test rejects "no change". An
                                     unpaired interval would ignore that most problems are
                                     answered alike by both models and be about twice as wide.
    mean_interval(scores)            a mean of per-problem scores in [0, 1] (the fraction of k
                                     samples right, R1's pass@1): the normal interval of the
                                     mean over problems, whose spread already holds the
                                     samples' correlation within a problem.
    paired_mean_difference(b, a)     the change of such a mean on the same problems: the normal
                                     interval of the mean per-problem difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for the proportion k / n."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def paired_difference(before: Sequence[bool], after: Sequence[bool], z: float = Z95) -> dict:
    """accuracy(after) - accuracy(before) on the same problems, with its interval from the
    discordant pairs: {"difference", "interval", "gains", "losses", "n"}."""
    if len(before) != len(after) or not before:
        raise ValueError(f"a paired difference needs two equally long, non-empty lists of "
                         f"results on the same problems, got {len(before)} and {len(after)}")
    n = len(before)
    gains = sum(1 for b, a in zip(before, after) if a and not b)
    losses = sum(1 for b, a in zip(before, after) if b and not a)
    m = gains + losses
    if m == 0:  # every problem answered alike: no evidence of a change either way
        interval = (0.0, 0.0)
    else:
        lo, hi = wilson_interval(gains, m, z)
        interval = (m / n * (2 * lo - 1), m / n * (2 * hi - 1))
    return {"difference": (gains - losses) / n, "interval": interval, "gains": gains,
            "losses": losses, "n": n}


def mean_interval(scores: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """The normal 95% interval of the mean of per-problem scores in [0, 1], clipped to [0, 1]."""
    mean, half = _mean_and_half_width(scores, z)
    return max(0.0, mean - half), min(1.0, mean + half)


def paired_mean_difference(before: Sequence[float], after: Sequence[float], z: float = Z95) -> dict:
    """mean(after) - mean(before) over the same problems, with the normal interval of the mean
    per-problem difference: {"difference", "interval", "n"}."""
    if len(before) != len(after) or not before:
        raise ValueError(f"a paired difference needs two equally long, non-empty lists of "
                         f"scores on the same problems, got {len(before)} and {len(after)}")
    diff, half = _mean_and_half_width([a - b for b, a in zip(before, after)], z)
    return {"difference": diff, "interval": (diff - half, diff + half), "n": len(before)}


def _mean_and_half_width(values: Sequence[float], z: float) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval of a mean needs at least 2 values, got {n}")
    return statistics.fmean(values), z * statistics.stdev(values) / math.sqrt(n)
