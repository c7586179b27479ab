"""Reward over-optimisation: the RM (proxy) score keeps rising while held-out labelers' (gold) utility peaks.

Along PPO checkpoints we record, on the same held-out prompts, the RM score of the policy's samples,
the held-out labelers' utility of the same samples, and the KL(pi || pi_SFT) of the policy; Gao et
al. (2022) plot both rewards against sqrt(KL) ("distance from the initial policy")::

    from rlhf_lib.evaluation import overoptimization as oo
    table = oo.overoptimization_table(steps=[0, 10, 20], rm_scores=[[...], [...], [...]],
                                      gold_utilities=[[...], [...], [...]], kl=[[...], [...], [...]])
    oo.overoptimization_summary(table)   # peak of gold utility, gains, a fitted d*(alpha - beta*d) curve

Each checkpoint entry is either a list of per-prompt values (then it gets a bootstrap interval over
prompts) or one number (interval collapses to the value). KL is in nats per sequence; sampled KL
estimates can be slightly negative, so sqrt(KL) uses max(KL, 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from rlhf_lib.evaluation.base import Metric, summarize

RM_SCORE = Metric("rm_score", "mean", True, "Mean reward-model (proxy) score of policy samples.")
GOLD_UTILITY = Metric("gold_utility", "mean", True, "Mean held-out-labeler (gold) utility of the same samples.")
KL = Metric("kl", "mean", False, "Mean sequence KL(pi || pi_SFT) in nats.")
METRICS = {m.name: m for m in (RM_SCORE, GOLD_UTILITY, KL)}

TABLE_COLUMNS = [
    "step",
    "kl",
    "sqrt_kl",
    "rm_score",
    "rm_ci_low",
    "rm_ci_high",
    "gold_utility",
    "gold_ci_low",
    "gold_ci_high",
    "n",
]


def _as_values(entry: float | Sequence[float]) -> np.ndarray:
    return np.atleast_1d(np.asarray(entry, dtype=float))


def overoptimization_table(
    steps: Sequence[int],
    rm_scores: Sequence[float | Sequence[float]],
    gold_utilities: Sequence[float | Sequence[float]],
    kl: Sequence[float | Sequence[float]],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per checkpoint: KL, sqrt(KL), RM score and gold utility with intervals, sorted by step."""
    lengths = {len(steps), len(rm_scores), len(gold_utilities), len(kl)}
    if len(lengths) != 1:
        raise ValueError(
            f"Per-checkpoint lists differ in length: steps {len(steps)}, rm_scores {len(rm_scores)}, "
            f"gold_utilities {len(gold_utilities)}, kl {len(kl)}."
        )
    rows = []
    for step, rm, gold, kls in zip(steps, rm_scores, gold_utilities, kl, strict=True):
        rm_res = summarize(_as_values(rm), "mean", n_resamples, seed, alpha)
        gold_res = summarize(_as_values(gold), "mean", n_resamples, seed, alpha)
        mean_kl = float(np.mean(_as_values(kls)))
        rows.append(
            {
                "step": int(step),
                "kl": mean_kl,
                "sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
                "rm_score": rm_res.value,
                "rm_ci_low": rm_res.ci_low,
                "rm_ci_high": rm_res.ci_high,
                "gold_utility": gold_res.value,
                "gold_ci_low": gold_res.ci_low,
                "gold_ci_high": gold_res.ci_high,
                "n": gold_res.n,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("step", kind="stable").reset_index(drop=True)


def fit_gold_curve(sqrt_kl: Sequence[float], gold_gain: Sequence[float]) -> tuple[float, float]:
    """Least-squares (alpha, beta) of gold_gain ~ d * (alpha - beta * d), d = sqrt(KL).

    This is Gao et al.'s best-of-n functional form: it rises, peaks at d* = alpha / (2 beta) when
    beta > 0, then falls. Returns (nan, nan) with fewer than two distinct non-zero d.
    """
    d = np.asarray(sqrt_kl, dtype=float)
    y = np.asarray(gold_gain, dtype=float)
    if np.unique(d[d > 0]).size < 2:
        return math.nan, math.nan
    design = np.column_stack([d, -(d**2)])
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(alpha), float(beta)


def _fitted_peak(alpha: float, beta: float) -> float:
    if math.isnan(beta):
        return math.nan
    return alpha / (2 * beta) if beta > 0 else math.inf  # beta <= 0: no turnover within this model


def overoptimization_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers of one PPO run's over-optimisation table.

    - rm_gain / gold_gain: final minus first checkpoint;
    - peak_gold_step, peak_gold_sqrt_kl, peak_gold_utility, gold_drop_from_peak;
    - overoptimized: the RM score rose past the gold peak while the final gold utility's interval lies
      entirely below the peak value (a drop beyond noise);
    - spearman_rm_gold: rank correlation of the two rewards across checkpoints (needs >= 3);
    - fit_alpha, fit_beta, fit_peak_sqrt_kl: the d * (alpha - beta * d) fit of the gold gain.
    """
    if table.empty:
        raise ValueError("The over-optimisation table is empty.")
    first, final = table.iloc[0], table.iloc[-1]
    peak = table.loc[table["gold_utility"].idxmax()]
    alpha, beta = fit_gold_curve(table["sqrt_kl"], table["gold_utility"] - first["gold_utility"])
    if len(table) >= 3 and table["rm_score"].nunique() > 1 and table["gold_utility"].nunique() > 1:
        rho = float(spearmanr(table["rm_score"], table["gold_utility"]).statistic)
    else:
        rho = math.nan
    return {
        "n_checkpoints": len(table),
        "rm_gain": float(final["rm_score"] - first["rm_score"]),
        "gold_gain": float(final["gold_utility"] - first["gold_utility"]),
        "final_sqrt_kl": float(final["sqrt_kl"]),
        "peak_gold_step": int(peak["step"]),
        "peak_gold_sqrt_kl": float(peak["sqrt_kl"]),
        "peak_gold_utility": float(peak["gold_utility"]),
        "gold_drop_from_peak": float(peak["gold_utility"] - final["gold_utility"]),
        "overoptimized": bool(
            final["rm_score"] > peak["rm_score"] and final["gold_ci_high"] < peak["gold_utility"]
        ),
        "spearman_rm_gold": rho,
        "fit_alpha": alpha,
        "fit_beta": beta,
        "fit_peak_sqrt_kl": _fitted_peak(alpha, beta),
    }
