"""Intervals that resample the unit that was sampled, Wilson / Clopper-Pearson intervals, verdicts.

The design's statistics rules (DESIGN.md, "Statistics"): resample prompts, never pairs or tokens (a
prompt's pairs share its completions and its labeler, so they are not independent); proportions get
Wilson or Clopper-Pearson intervals, which never have zero width, not even at 0/n or n/n; differences
between methods answering the same items get a paired bootstrap over items; a verdict beside the paper
is "agrees" only when the whole interval lies on the paper's side of no effect::

    from rlhf_lib.evaluation import stats
    stats.wilson_interval(0, 10)                          # (0.0, 0.2775...)
    stats.clopper_pearson_interval(0, 10)                 # (0.0, 0.3085...), exact
    stats.paired_bootstrap(f1_ppo_ptx, f1_ppo)            # mean per-item difference, items resampled
    stats.cluster_ratio(correct, pairs, n_resamples=2000)  # sum/sum over prompts, prompts resampled
    stats.verdict(0.55, 0.70, no_effect=0.5, side="above")  # "agrees"
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np

from rlhf_lib.evaluation.base import MetricResult

VERDICTS = ("agrees", "disagrees", "inconclusive")


def _z(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    return NormalDist().inv_cdf(1 - alpha / 2)


def wilson_interval(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score (1 - alpha) interval of a proportion successes / n.

    Unlike the normal approximation or a percentile bootstrap, it has positive width at 0/n and n/n
    (at 0/n it is [0, z^2 / (n + z^2)]). `successes` may be fractional (n times a mean of values in
    [0, 1]): a variable bounded in [0, 1] with mean p has variance at most p(1 - p), so the interval is
    then a conservative stand-in.
    """
    if n < 1:
        raise ValueError(f"A proportion needs n >= 1, got {n}.")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}.")
    z = _z(alpha)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0/n and n/n the bound is exactly 0 or 1; rounding would leave 1e-17 or 1 - 1e-16.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def clopper_pearson_interval(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) (1 - alpha) interval of successes / n, from beta quantiles.

    Its coverage is at least 1 - alpha for every true proportion (Wilson's is about 1 - alpha on
    average), at the price of width: at 0/n the upper bound is 1 - (alpha / 2) ** (1 / n). A fractional
    `successes` uses the beta quantiles at non-integer parameters, the interval's continuous extension.
    """
    from scipy.stats import beta

    if n < 1:
        raise ValueError(f"A proportion needs n >= 1, got {n}.")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}.")
    _z(alpha)  # validates alpha
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


INTERVALS = {"wilson": wilson_interval, "clopper-pearson": clopper_pearson_interval}


def proportion(
    successes: int, n: int, alpha: float = 0.05, method: Literal["wilson", "clopper-pearson"] = "wilson"
) -> MetricResult:
    """successes / n with its Wilson (or Clopper-Pearson) interval; n counts the independent units."""
    if method not in INTERVALS:
        raise ValueError(f"method must be one of {tuple(INTERVALS)}, got {method!r}.")
    low, high = INTERVALS[method](successes, n, alpha)
    return MetricResult(successes / n, low, high, int(n))


def cluster_ratio(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> MetricResult:
    """sum(numerators) / sum(denominators), with a percentile bootstrap that resamples clusters.

    One entry per cluster (a prompt): for RM accuracy, (correct pairs, pairs) of each prompt, so a
    prompt is drawn with all its pairs and the value is the pooled pair accuracy; for a length ratio,
    (PPO words, SFT words) of each prompt, a paired bootstrap over prompts. n is the number of clusters.
    """
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"Need two 1-D arrays of one entry per cluster, got {num.shape} and {den.shape}.")
    n = num.shape[0]
    if n == 0 or den.sum() <= 0:
        return MetricResult(math.nan, math.nan, math.nan, int(n))
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}.")
    _z(alpha)  # validates alpha
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    rows = max(1, 4_000_000 // n)  # chunks keep the index matrix small
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        with np.errstate(divide="ignore", invalid="ignore"):
            stats[start:stop] = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    stats = stats[np.isfinite(stats)]
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2]) if stats.size else (math.nan, math.nan)
    return MetricResult(float(num.sum() / den.sum()), float(low), float(high), int(n))


def clustered_accuracy(
    correct: Sequence[float] | np.ndarray,
    clusters: Sequence[object],
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> MetricResult:
    """Share of correct items (pairs), with an interval that resamples clusters (prompts) whole."""
    values = np.asarray(correct, dtype=float)
    keys = np.asarray([str(c) for c in clusters])
    if values.shape != keys.shape:
        raise ValueError(f"{values.shape} values vs {keys.shape} cluster labels.")
    _, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(float)
    return cluster_ratio(sums, counts, n_resamples=n_resamples, seed=seed, alpha=alpha)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    bounds: tuple[float, float] | None = None,
) -> MetricResult:
    """Mean of a - b over the same items (or mean of `a`, already per-item differences, when b is None),
    with a percentile bootstrap that resamples items, each with both of its values.

    Resampling the pairs keeps what the two methods share per item (an easy question is easy for both),
    so the interval is narrower than comparing two separately resampled means when items are correlated.
    n is the number of items. `bounds` is the range a per-item difference can take (e.g. (-1, 1) for two
    rates): when every item has the same difference d the bootstrap has nothing to resample and would
    give [d, d]; with bounds the interval becomes what the unseen items could do, the Clopper-Pearson
    bound on the share of items that differ from d (at most 1 - (alpha / 2) ** (1 / n) of 0 of n seen)
    times the room left towards each bound.
    """
    diff = np.asarray(a, dtype=float) if b is None else np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.ndim != 1:
        raise ValueError(f"Need 1-D per-item values (aligned when two are given), got shape {diff.shape}.")
    result = cluster_ratio(diff, np.ones_like(diff), n_resamples=n_resamples, seed=seed, alpha=alpha)
    if bounds is None or result.n == 0 or result.ci_high > result.ci_low:
        return result
    low_bound, high_bound = bounds
    if not low_bound <= result.value <= high_bound or not low_bound < high_bound:
        raise ValueError(f"bounds {bounds} must be increasing and contain the mean difference {result.value}.")
    share = clopper_pearson_interval(0, result.n, alpha)[1]
    return MetricResult(result.value, result.value - share * (result.value - low_bound),
                        result.value + share * (high_bound - result.value), result.n)


# A bootstrap over fewer resampled units than this gives intervals too narrow to trust (with 2 prompts it
# can only ever see 3 distinct resamples), so it decides nothing.
MIN_UNITS_FOR_VERDICT = 10


def verdict(
    low: float, high: float, no_effect: float, side: Literal["above", "below"], n: int | None = None
) -> str:
    """"agrees" when [low, high] lies wholly on the paper's side of no effect, "disagrees" when wholly on
    the other side, else "inconclusive" (an interval that touches no effect decides nothing; so does one
    resampled from fewer than MIN_UNITS_FOR_VERDICT units `n`)."""
    if side not in ("above", "below"):
        raise ValueError(f"side must be 'above' or 'below', got {side!r}.")
    if not all(math.isfinite(x) for x in (low, high, no_effect)) or (n is not None and n < MIN_UNITS_FOR_VERDICT):
        return "inconclusive"
    if low > no_effect:
        return "agrees" if side == "above" else "disagrees"
    if high < no_effect:
        return "disagrees" if side == "above" else "agrees"
    return "inconclusive"
