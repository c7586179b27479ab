"""Inter-labeler agreement, and the noise calibration that brings it to the paper's ~73%.

`agreement`: the share of completion pairs two labelers order the same way, averaged per group of
labeler pairs (train-train, heldout-heldout, train-heldout), with a 95% bootstrap interval over
prompts (`AgreementReport`). `calibrate_noise`: the shared noise scale at which training labelers
agree on a target share of pairs (the paper's labelers: 72.6 +- 1.5%).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf_lib.labelers.criteria import _get, score_completions
from rlhf_lib.labelers.population import POPULATIONS, Labeler, with_noise
from rlhf_lib.labelers.ranking import _stable_int, _unique_normals


@dataclass(frozen=True)
class AgreementEstimate:
    """Mean pairwise agreement of a group of labeler pairs, with a 95% bootstrap interval over prompts."""

    mean: float
    low: float
    high: float
    labeler_pairs: int
    compared_pairs: int  # completion pairs that neither labeler tied, summed over labeler pairs


@dataclass(frozen=True)
class AgreementReport:
    """Agreement per group ("train-train", "heldout-heldout", "train-heldout") at a noise scale."""

    groups: dict[str, AgreementEstimate]
    noise_scale: float
    n_prompts: int
    target: float | None = None

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per group, ready for a CSV / DataFrame."""
        return [
            {"group": name, "noise_scale": self.noise_scale, "n_prompts": self.n_prompts, "target": self.target,
             **dataclasses.asdict(est)}
            for name, est in self.groups.items()
        ]

    def __str__(self) -> str:
        lines = [f"agreement at noise {self.noise_scale:.4f} on {self.n_prompts} prompts"
                 + (f" (target {self.target:.3f})" if self.target is not None else "")]
        for name, est in self.groups.items():
            lines.append(f"  {name:16s} {est.mean:.3f} [{est.low:.3f}, {est.high:.3f}]  "
                         f"({est.labeler_pairs} labeler pairs, {est.compared_pairs} comparisons)")
        return "\n".join(lines)


@dataclass
class _PreparedSet:
    """Utilities and noise draws of every labeler on every prompt, padded to K_max."""

    utilities: np.ndarray  # (P, L, K) deterministic, NaN padding
    normals: np.ndarray  # (P, L, K) standard normals, one per distinct completion
    noise: np.ndarray  # (L,) each labeler's own noise scale
    valid_pairs: np.ndarray  # (P, M) which of the K_max choose 2 pairs exist for the prompt
    pair_i: np.ndarray
    pair_j: np.ndarray


def _check_inputs(prompt_rows: Sequence[Mapping[str, Any]], completions_per_prompt: Sequence[Sequence[str]]) -> None:
    if len(prompt_rows) != len(completions_per_prompt):
        raise ValueError(f"{len(prompt_rows)} prompt rows but {len(completions_per_prompt)} completion lists.")
    for row, completions in zip(prompt_rows, completions_per_prompt, strict=True):
        if len(completions) < 2:
            raise ValueError(f"Prompt {_get(row, 'id', '?')!r}: need at least 2 completions to compare, got {len(completions)}.")


def _prepare(
    labelers: Sequence[Labeler], prompt_rows: Sequence[Mapping[str, Any]],
    completions_per_prompt: Sequence[Sequence[str]], seed: int,
) -> _PreparedSet:
    _check_inputs(prompt_rows, completions_per_prompt)
    n_prompts, n_labelers = len(prompt_rows), len(labelers)
    k_max = max(len(c) for c in completions_per_prompt)
    utilities = np.full((n_prompts, n_labelers, k_max), np.nan)
    normals = np.zeros((n_prompts, n_labelers, k_max))
    pair_i, pair_j = np.triu_indices(k_max, k=1)
    valid = np.zeros((n_prompts, len(pair_i)), dtype=bool)
    for p, (row, completions) in enumerate(zip(prompt_rows, completions_per_prompt, strict=True)):
        k = len(completions)
        scores = score_completions(row, completions)  # once per prompt, shared by all labelers
        valid[p] = pair_j < k
        for l_index, labeler in enumerate(labelers):
            utilities[p, l_index, :k] = labeler.utilities_from_scores(row, scores)
            # Each labeler sees each prompt's comparison once, with its own fresh noise.
            rng = np.random.default_rng([seed, _stable_int(labeler.id), _stable_int(_get(row, "id", p))])
            normals[p, l_index, :k] = _unique_normals(completions, rng)
    noise = np.array([lab.noise_scale for lab in labelers])
    return _PreparedSet(utilities, normals, noise, valid, pair_i, pair_j)


def _pair_counts(prep: _PreparedSet, noise: np.ndarray, pairs_a: np.ndarray, pairs_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(agree, compared) counts of shape (P, G) for labeler pairs (pairs_a[g], pairs_b[g])."""
    noisy = np.nan_to_num(prep.utilities) + noise[None, :, None] * prep.normals
    signs = np.sign(noisy[:, :, prep.pair_i] - noisy[:, :, prep.pair_j])  # (P, L, M)
    signs = np.where(prep.valid_pairs[:, None, :], signs, 0.0)
    s_a, s_b = signs[:, pairs_a, :], signs[:, pairs_b, :]  # (P, G, M)
    compared = (s_a != 0) & (s_b != 0)  # a pair either labeler tied is not a disagreement, just excluded
    agree = compared & (s_a == s_b)
    return agree.sum(axis=2).astype(float), compared.sum(axis=2).astype(float)


def _group_mean(agree: np.ndarray, compared: np.ndarray) -> float:
    """Mean over labeler pairs of each pair's agreement rate (pooled over prompts)."""
    totals = compared.sum(axis=-2)
    rates = np.where(totals > 0, agree.sum(axis=-2) / np.maximum(totals, 1), np.nan)
    return float(np.nanmean(rates)) if np.isfinite(rates).any() else float("nan")


def _labeler_pair_groups(labelers: Sequence[Labeler]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for a in range(len(labelers)):
        for b in range(a + 1, len(labelers)):
            pop_a, pop_b = sorted((labelers[a].population, labelers[b].population), key=POPULATIONS.index)
            name = f"{pop_a}-{pop_b}"
            groups.setdefault(name, ([], []))
            groups[name][0].append(a)
            groups[name][1].append(b)
    order = ["train-train", "heldout-heldout", "train-heldout"]
    return {name: (np.array(groups[name][0]), np.array(groups[name][1])) for name in order if name in groups}


def _bootstrap_estimate(agree: np.ndarray, compared: np.ndarray, n_boot: int, rng: np.random.Generator) -> AgreementEstimate:
    n_prompts = agree.shape[0]
    weights = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(float)  # (B, P)
    boot_agree, boot_compared = weights @ agree, weights @ compared  # (B, G): prompts resampled with replacement
    rates = np.where(boot_compared > 0, boot_agree / np.maximum(boot_compared, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows when a resample has no comparisons
        boot_means = np.nanmean(rates, axis=1)
    boot_means = boot_means[np.isfinite(boot_means)]
    low, high = (np.percentile(boot_means, [2.5, 97.5]) if boot_means.size else (np.nan, np.nan))
    return AgreementEstimate(
        mean=_group_mean(agree, compared), low=float(low), high=float(high),
        labeler_pairs=agree.shape[1], compared_pairs=int(compared.sum()),
    )


def _report(prep: _PreparedSet, labelers: Sequence[Labeler], n_boot: int, seed: int, target: float | None) -> AgreementReport:
    rng = np.random.default_rng([seed, 7])
    groups = {}
    for name, (a, b) in _labeler_pair_groups(labelers).items():
        agree, compared = _pair_counts(prep, prep.noise, a, b)
        groups[name] = _bootstrap_estimate(agree, compared, n_boot, rng)
    scales = {lab.noise_scale for lab in labelers}
    return AgreementReport(
        groups=groups, noise_scale=scales.pop() if len(scales) == 1 else float("nan"),
        n_prompts=prep.utilities.shape[0], target=target,
    )


def agreement(
    labelers: Sequence[Labeler], prompt_rows: Sequence[Mapping[str, Any]],
    completions_per_prompt: Sequence[Sequence[str]], seed: int = 0, n_boot: int = 1000,
) -> AgreementReport:
    """Inter-labeler agreement: every labeler ranks every prompt's completions once (fresh noise).

    For two labelers, agreement is the share of completion pairs (all C(K, 2) of each prompt)
    they order the same way, excluding pairs that either of them tied; it is averaged over the
    labeler pairs of each group (train-train, heldout-heldout, train-heldout, as present in
    `labelers`). The 95% interval resamples prompts with replacement.
    """
    if len(labelers) < 2:
        raise ValueError("Agreement needs at least two labelers.")
    prep = _prepare(labelers, prompt_rows, completions_per_prompt, seed)
    return _report(prep, labelers, n_boot, seed, target=None)


def calibrate_noise(
    population: Sequence[Labeler], prompt_rows: Sequence[Mapping[str, Any]],
    completions_per_prompt: Sequence[Sequence[str]], target: float = 0.726, seed: int = 0,
    n_boot: int = 1000, tolerance: float = 1e-4,
) -> tuple[float, AgreementReport]:
    """Find the shared noise scale at which labelers of `population` agree on `target` of pairs.

    Bisection on the noise scale with the noise draws held fixed (common random numbers), so the
    agreement is a (step-wise) monotone function of the scale. Returns the scale and the report at
    that scale on the same completions. If the labelers already agree less than `target` without
    noise, returns 0.0 and warns: their weights differ more than the target allows.
    """
    if len(population) < 2:
        raise ValueError("Calibration needs at least two labelers.")
    population = with_noise(population, 0.0)
    prep = _prepare(population, prompt_rows, completions_per_prompt, seed)
    pairs = np.array(list(zip(*np.triu_indices(len(population), k=1), strict=True)))
    pairs_a, pairs_b = pairs[:, 0], pairs[:, 1]

    def rate(scale: float) -> float:
        agree, compared = _pair_counts(prep, np.full(len(population), scale), pairs_a, pairs_b)
        return _group_mean(agree, compared)

    if rate(0.0) <= target:
        warnings.warn(
            f"Labelers agree {rate(0.0):.3f} <= target {target} without noise; using noise 0.", stacklevel=2
        )
        best = 0.0
    else:
        low, high = 0.0, 0.05
        while rate(high) > target and high < 1e3:  # agreement falls towards 0.5 as noise grows
            low, high = high, high * 2
        best, best_gap = high, abs(rate(high) - target)
        for _ in range(60):
            mid = (low + high) / 2
            value = rate(mid)
            if abs(value - target) < best_gap:
                best, best_gap = mid, abs(value - target)
            if best_gap < tolerance:
                break
            low, high = (mid, high) if value > target else (low, mid)
    prep.noise = np.full(len(population), best)
    return best, _report(prep, with_noise(population, best), n_boot, seed, target)
