"""Shared pieces of every metric family: metric declarations, results with intervals, the bootstrap.

A metric is declared the way lm-evaluation-harness declares one: a name, how per-item values are
aggregated into one number, and whether higher is better. `Metric.compute` aggregates per-item values
and attaches a seeded percentile-bootstrap interval over items (prompts, questions, pairs, documents)::

    from rlhf_lib.evaluation.base import Metric, bootstrap_ci
    acc = Metric("accuracy", "mean", True, "Share of items answered correctly.")
    acc.compute([1, 0, 1, 1], n_resamples=1000, seed=0)   # MetricResult(value=0.75, ci_low=..., n=4)
    bootstrap_ci([0.2, 0.4, 0.9], "mean", n_resamples=1000, seed=0)  # (low, high)

Per-item values may be 2-D (one row per item) when the statistic needs several numbers per item, e.g.
(summed NLL, token count) for a token-weighted mean; rows are resampled together.

Judges (the simulated held-out labelers of `rlhf_lib.labelers`) are used through the small `Judge`
protocol below, so the metrics here depend on the interface only and tests can pass fakes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The methods compared in the study, in the order every table and figure uses (the paper's order,
# then the two additions beyond the paper).
METHODS = ("GPT", "GPT prompted", "SFT", "PPO", "PPO-ptx", "best-of-n", "DPO")

# Metadata flags every judge reports (InstructGPT Figure 4 / appendix: labelers' metadata questions).
FLAG_KEYS = ("fails_instruction", "hallucinates", "toxic", "inappropriate_for_customer_assistant")


@runtime_checkable
class Judge(Protocol):
    """What the evaluation needs from a (simulated) labeler."""

    def utility(self, prompt_row: Mapping[str, Any], completion: str) -> float:
        """Scalar quality of a completion; higher is preferred."""
        ...

    def likert(self, prompt_row: Mapping[str, Any], completion: str) -> int:
        """Overall quality on the paper's 1-7 Likert scale."""
        ...

    def flags(self, prompt_row: Mapping[str, Any], completion: str) -> dict[str, bool]:
        """Metadata flags, with at least the keys of FLAG_KEYS."""
        ...


# --------------------------------------------------------------------------------------------
# Aggregations: per-item array (items along axis 0) -> one number
# --------------------------------------------------------------------------------------------


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _ratio_of_sums(values: np.ndarray) -> float:
    # Column 0 summed over items divided by column 1 summed: a token-weighted mean when rows are
    # (sum of token NLLs, token count), so long documents weigh by their tokens, as LM loss should.
    total = float(np.sum(values[:, 1]))
    return float(np.sum(values[:, 0]) / total) if total > 0 else math.nan


def _exp_ratio_of_sums(values: np.ndarray) -> float:
    return float(math.exp(_ratio_of_sums(values)))


AGGREGATIONS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": _mean,
    "median": lambda values: float(np.median(values)),
    "ratio_of_sums": _ratio_of_sums,
    "perplexity": _exp_ratio_of_sums,
}


def _statistic(statistic: str | Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
    if callable(statistic):
        return statistic
    if statistic not in AGGREGATIONS:
        raise KeyError(f"Unknown aggregation '{statistic}'. Known: {', '.join(AGGREGATIONS)}.")
    return AGGREGATIONS[statistic]


# --------------------------------------------------------------------------------------------
# Results and the bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricResult:
    """A point estimate with its (1 - alpha) bootstrap interval over `n` items."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: str | Callable[[np.ndarray], float] = "mean",
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) interval of `statistic` over items (axis 0 of `values`).

    Resamples items with replacement `n_resamples` times from a generator seeded with `seed`, so the
    same inputs always give the same interval. Returns (nan, nan) for no items.
    """
    data = np.asarray(values, dtype=float)
    n = data.shape[0] if data.ndim else 0
    if n == 0:
        return math.nan, math.nan
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}.")
    rng = np.random.default_rng(seed)
    is_mean = statistic == "mean" or statistic is np.mean
    if is_mean and data.ndim == 1:
        # Vectorised fast path for the common case; chunked so memory stays ~O(8M) indices.
        rows = max(1, 8_000_000 // n)
        stats = np.empty(n_resamples)
        for start in range(0, n_resamples, rows):
            stop = min(n_resamples, start + rows)
            idx = rng.integers(0, n, size=(stop - start, n))
            stats[start:stop] = data[idx].mean(axis=1)
    else:
        fn = _statistic(statistic)
        stats = np.array([fn(data[rng.integers(0, n, size=n)]) for _ in range(n_resamples)])
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(
    values: Sequence[float] | np.ndarray,
    statistic: str | Callable[[np.ndarray], float] = "mean",
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> MetricResult:
    """`statistic` of the per-item values with its bootstrap interval, as a MetricResult."""
    data = np.asarray(values, dtype=float)
    n = int(data.shape[0]) if data.ndim else 0
    if n == 0:
        return MetricResult(math.nan, math.nan, math.nan, 0)
    value = _statistic(statistic)(data)
    low, high = bootstrap_ci(data, statistic, n_resamples=n_resamples, seed=seed, alpha=alpha)
    return MetricResult(float(value), low, high, n)


@dataclass(frozen=True)
class Metric:
    """Declaration of one metric: its name, aggregation over items, and direction."""

    name: str
    aggregation: str  # a key of AGGREGATIONS
    higher_is_better: bool
    description: str = ""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise KeyError(f"Metric '{self.name}': unknown aggregation '{self.aggregation}'.")

    def compute(
        self, per_item: Sequence[float] | np.ndarray, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
    ) -> MetricResult:
        """Aggregate per-item values and attach the bootstrap interval over items."""
        return summarize(per_item, self.aggregation, n_resamples=n_resamples, seed=seed, alpha=alpha)


def result_row(metric: Metric, result: MetricResult, **keys: Any) -> dict[str, Any]:
    """One tidy table row: grouping keys, the metric's name and direction, and its result."""
    return {**keys, "metric": metric.name, "higher_is_better": metric.higher_is_better, **result.to_dict()}


def prompt_lookup(prompts: Any) -> dict[str, Mapping[str, Any]]:
    """Prompt rows by id, from a DataFrame / datasets.Dataset / list of dicts with an `id` field, or a mapping."""
    if isinstance(prompts, Mapping):
        return {str(k): v for k, v in prompts.items()}
    if hasattr(prompts, "to_dict") and hasattr(prompts, "columns"):  # pandas DataFrame
        records = prompts.to_dict(orient="records")
    else:
        records = list(prompts)
    lookup = {}
    for row in records:
        if "id" not in row:
            raise KeyError("Each prompt row needs an 'id' field to be matched with generations' prompt_id.")
        lookup[str(row["id"])] = row
    return lookup


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def require_columns(frame: Any, columns: Sequence[str], what: str) -> None:
    """Raise a KeyError naming the missing columns of a DataFrame input."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}.")


def _order_key(value: Any, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), str(value))


def sort_frame(frame: Any) -> Any:
    """Rows in the study's canonical order: methods as in METHODS, sizes as in config.PRESETS."""
    from rlhf_lib.config import PRESETS

    keys: list[tuple[str, Sequence[str]]] = [("method", METHODS), ("size", PRESETS)]
    present = [(col, order) for col, order in keys if col in frame.columns]
    if not present or frame.empty:
        return frame.reset_index(drop=True)
    sort_keys = frame[[c for c, _ in present]].apply(
        lambda row: tuple(_order_key(row[c], order) for c, order in present), axis=1
    )
    return frame.loc[sort_keys.sort_values(kind="stable").index].reset_index(drop=True)


def group_summary(
    per_item: Any,
    value_column: str,
    metric: Metric,
    by: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Any:
    """One tidy row per group of `by`: `metric` over the group's per-item `value_column`, with its CI."""
    import pandas as pd

    require_columns(per_item, [*by, value_column], "per-item table")
    rows = []
    for keys, group in per_item.groupby(list(by), sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        values = group[value_column].dropna().to_numpy(dtype=float)
        result = metric.compute(values, n_resamples=n_resamples, seed=seed, alpha=alpha)
        rows.append(result_row(metric, result, **dict(zip(by, keys, strict=True))))
    columns = [*by, "metric", "higher_is_better", "value", "ci_low", "ci_high", "n"]
    return sort_frame(pd.DataFrame(rows, columns=columns))
