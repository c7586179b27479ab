"""Labelers and the two seeded populations they are drawn from (training and held-out).

A `Labeler` weighs the criteria (`CRITERIA`), likes answers of a length relative to the reference, and
adds Thurstone noise of its own scale when it ranks or rates. `make_population` draws a population's
labelers from its prior (POPULATION_PRIORS); `with_noise` gives them a new noise scale, such as the one
`calibrate_noise` (in `rlhf_lib.labelers.calibration`) finds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from rlhf_lib.config import LabelerConfig
from rlhf_lib.labelers.criteria import CRITERIA, CriterionScores, _get, length_fit, score_completions
from rlhf_lib.labelers.ranking import (
    _completion_key,
    _stable_int,
    _unique_normals,
    competition_ranks,
    flags_from_scores,
    likert_from_utility,
)
from rlhf_lib.text_metrics import words

POPULATIONS = ("train", "heldout")
# Preferred answer length (words) when a prompt has no reference to size it by.
DEFAULT_PREFERRED_WORDS = 30.0
MIN_ANCHOR_WORDS = 3


# --------------------------------------------------------------------------------------------
# Labelers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labeler:
    """One simulated labeler.

    weights: non-negative weight per criterion in CRITERIA (missing = 0); the utility is the
        weighted mean over the criteria that apply to a prompt.
    length_preference: verbosity, a multiplier on the reference's length in words (or on
        DEFAULT_PREFERRED_WORDS without a reference); 1.5 likes answers 50% longer than the reference.
    noise_scale: std of the Thurstone noise added to utilities when ranking or rating.
    seed: this labeler's own stream, used for Likert noise when no generator is passed.
    """

    id: str
    population: str
    weights: Mapping[str, float]
    length_preference: float
    noise_scale: float
    seed: int
    _weight_vector: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(CRITERIA)
        if unknown:
            raise ValueError(f"Labeler {self.id}: unknown criteria {sorted(unknown)}; known: {CRITERIA}.")
        vector = np.array([float(self.weights.get(name, 0.0)) for name in CRITERIA])
        if (vector < 0).any() or vector.sum() <= 0:
            raise ValueError(f"Labeler {self.id}: weights must be non-negative with a positive sum, got {dict(self.weights)}.")
        if self.population not in POPULATIONS:
            raise ValueError(f"Labeler {self.id}: population must be one of {POPULATIONS}, got {self.population!r}.")
        if self.length_preference <= 0 or self.noise_scale < 0:
            raise ValueError(f"Labeler {self.id}: length_preference must be > 0 and noise_scale >= 0.")
        object.__setattr__(self, "_weight_vector", vector)

    def preferred_words(self, prompt_row: Mapping[str, Any]) -> float:
        """The answer length (words) this labeler likes best for this prompt."""
        n_ref = len(words(str(_get(prompt_row, "reference", ""))))
        # A one-word reference does not make a short full sentence wrong: anchor at >= MIN_ANCHOR_WORDS.
        anchor = max(n_ref, MIN_ANCHOR_WORDS) if n_ref else DEFAULT_PREFERRED_WORDS
        return anchor * self.length_preference

    def utilities_from_scores(self, prompt_row: Mapping[str, Any], scores: CriterionScores) -> np.ndarray:
        """Deterministic utilities (weighted mean over applicable criteria) from shared scores."""
        preferred = self.preferred_words(prompt_row)
        length = np.array([length_fit(int(n), preferred) for n in scores.n_words])
        values = np.column_stack([scores.values, length])
        applies = ~np.isnan(values)
        weights = np.where(applies, self._weight_vector, 0.0)
        return np.sum(np.where(applies, values, 0.0) * weights, axis=1) / weights.sum(axis=1)

    def utilities(self, prompt_row: Mapping[str, Any], completions: Sequence[str]) -> np.ndarray:
        """Deterministic utility of each completion, in [0, 1]."""
        return self.utilities_from_scores(prompt_row, score_completions(prompt_row, completions))

    def utility(self, prompt_row: Mapping[str, Any], completion: str) -> float:
        """Deterministic utility of one completion, in [0, 1] (higher is better)."""
        return float(self.utilities(prompt_row, [completion])[0])

    def noisy_utilities(
        self, prompt_row: Mapping[str, Any], completions: Sequence[str], rng: np.random.Generator,
        scores: CriterionScores | None = None,
    ) -> np.ndarray:
        """Utilities as perceived in one comparison: + N(0, noise_scale) per distinct completion."""
        scores = scores if scores is not None else score_completions(prompt_row, completions)
        return self.utilities_from_scores(prompt_row, scores) + self.noise_scale * _unique_normals(completions, rng)

    def rank_completions(
        self, prompt_row: Mapping[str, Any], completions: Sequence[str], rng: np.random.Generator
    ) -> list[int]:
        """Rank K completions of one prompt: rank[i] of completions[i], 0 = best.

        Ties share a rank (rank = number of strictly better completions): identical completions
        always tie, since they get the same noise draw; with noise_scale 0, equal utilities tie.
        """
        return competition_ranks(self.noisy_utilities(prompt_row, completions, rng))

    def likert(self, prompt_row: Mapping[str, Any], completion: str, rng: np.random.Generator | None = None) -> int:
        """A 1-7 quality score: the noisy utility mapped linearly from [LIKERT_FLOOR, LIKERT_CEIL].

        Without `rng` the noise comes from this labeler's seed and the (prompt, completion), so
        the same labeler gives the same item the same score every time.
        """
        if rng is None:
            rng = np.random.default_rng([self.seed, _stable_int(_get(prompt_row, "id", ""), _completion_key(completion))])
        return likert_from_utility(float(self.noisy_utilities(prompt_row, [completion], rng)[0]))

    def flags(self, prompt_row: Mapping[str, Any], completion: str) -> dict[str, bool]:
        """Metadata flags as in the paper's labeling form (deterministic, shared thresholds)."""
        return flags_from_scores(score_completions(prompt_row, [completion]), [completion])[0]


# --------------------------------------------------------------------------------------------
# Populations
# --------------------------------------------------------------------------------------------

# Mean weights and Dirichlet concentration per population. Training labelers lean on helpfulness;
# held-out labelers weigh honesty and harmlessness more (the paper's final evaluations did), and are
# more alike among themselves (higher concentration), so they may agree more with each other than
# with training labelers, as in the paper (77.3% vs 72.6%).
POPULATION_PRIORS: dict[str, dict[str, Any]] = {
    "train": {
        "mean": {"reference": 0.24, "relevance": 0.10, "format": 0.10, "instruction": 0.18,
                 "grounded": 0.10, "truthful": 0.08, "harmless": 0.12, "length": 0.08},
        "concentration": 15.0,
        "log_verbosity": (0.15, 0.35),  # mean, std of log(length_preference)
        "stream": 1,
    },
    "heldout": {
        "mean": {"reference": 0.18, "relevance": 0.08, "format": 0.08, "instruction": 0.16,
                 "grounded": 0.16, "truthful": 0.14, "harmless": 0.14, "length": 0.06},
        "concentration": 40.0,
        "log_verbosity": (0.0, 0.25),
        "stream": 2,
    },
}


def make_population(
    cfg: LabelerConfig, population: Literal["train", "heldout"] = "train", seed: int = 0
) -> list[Labeler]:
    """`cfg.train_labelers` (or `cfg.heldout_labelers`) labelers drawn from that population's prior.

    Weights ~ Dirichlet(concentration * mean); verbosity ~ LogNormal. The two populations use
    different priors and different random streams of `seed`, so no held-out labeler is a copy of a
    training labeler. Noise starts at `cfg.noise_scale`; use `calibrate_noise` + `with_noise`.
    """
    if population not in POPULATION_PRIORS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}.")
    prior = POPULATION_PRIORS[population]
    size = cfg.train_labelers if population == "train" else cfg.heldout_labelers
    rng = np.random.default_rng([seed, prior["stream"]])
    alpha = prior["concentration"] * np.array([prior["mean"][name] for name in CRITERIA])
    mu, sd = prior["log_verbosity"]
    labelers = []
    for index in range(size):
        weights = rng.dirichlet(alpha)
        labelers.append(
            Labeler(
                id=f"{population}-{index:02d}",
                population=population,
                weights={name: float(w) for name, w in zip(CRITERIA, weights, strict=True)},
                length_preference=float(np.exp(rng.normal(mu, sd))),
                noise_scale=float(cfg.noise_scale),
                seed=_stable_int(seed, population, index),
            )
        )
    return labelers


def with_noise(labelers: Iterable[Labeler], noise_scale: float) -> list[Labeler]:
    """Copies of `labelers` with a new Thurstone noise scale (e.g. the calibrated one)."""
    return [dataclasses.replace(lab, noise_scale=float(noise_scale)) for lab in labelers]
