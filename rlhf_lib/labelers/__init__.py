"""Simulated labelers: the programmatic, inspectable stand-in for InstructGPT's human labelers.

A labeler judges a (prompt, completion) with a *utility* in [0, 1]: a weighted mean of criteria
that can each be measured and tested on their own (see `CRITERIA`). Labelers differ in their
weights and in how long they like answers to be, and they are noisy: when ranking K completions
of one prompt, each labeler adds Thurstone noise N(0, noise_scale) to every distinct completion's
utility, freshly for every comparison it is shown. The noise is calibrated so that two training
labelers agree on about 73% of pairs, as the paper's labelers did (72.6 +- 1.5%).

    criteria    the criteria a utility is built from (`CRITERIA`), toxicity, `score_completions` of a prompt
    ranking     noise draws, `competition_ranks`, the Likert mapping and the labeling form's flags
    population  `Labeler` (weights, verbosity, noise) and the seeded populations: `make_population`, `with_noise`
    calibration inter-labeler agreement (`agreement`) and the noise calibration to ~73% (`calibrate_noise`)
    labeling    a resumable labeling run: `label_comparisons`, rows of COMPARISON_FEATURES

Usage::

    import numpy as np
    from rlhf_lib.config import load_preset
    from rlhf_lib import labelers as L

    cfg = load_preset("tiny")
    train = L.make_population(cfg.labelers, "train", seed=cfg.seed)
    heldout = L.make_population(cfg.labelers, "heldout", seed=cfg.seed)
    sigma, report = L.calibrate_noise(train, prompt_rows, completions, target=cfg.labelers.target_agreement)
    train, heldout = L.with_noise(train, sigma), L.with_noise(heldout, sigma)
    print(L.agreement(train + heldout, prompt_rows, completions, seed=1))   # train-train, heldout-heldout, train-heldout
    comparisons = L.label_comparisons(prompt_rows, completions, sources, train, seed=0, out_path=run_dir / "cmp.jsonl")

    labeler = train[0]
    labeler.utility(row, "Paris.")                      # deterministic utility in [0, 1]
    labeler.rank_completions(row, ["Paris.", "Rome."], np.random.default_rng(0))   # e.g. [0, 1]; 0 = best
    labeler.likert(row, "Paris.")                       # 1..7
    labeler.flags(row, "Paris.")                        # {'fails_instruction': False, 'hallucinates': False, ...}

A prompt row is a mapping with the fields of `rlhf_lib.data.schema.PROMPT_FEATURES` (prompt, reference,
category, context, allowed_labels, id). TruthfulQA-style rows may also carry `correct_answers` and
`incorrect_answers` (lists of strings); `truthfulqa_prompt_row` builds such a row.

Every public name of the submodules is importable from `rlhf_lib.labelers`. A test that monkeypatches a
function another one calls must patch the submodule that holds the caller (e.g.
`rlhf_lib.labelers.criteria._profanity_model`).
"""

from __future__ import annotations

from rlhf_lib.labelers.calibration import AgreementEstimate, AgreementReport, agreement, calibrate_noise
from rlhf_lib.labelers.criteria import (
    CLOSED_DOMAIN_CATEGORIES,
    CRITERIA,
    LENGTH_GAP_FOR_ZERO,
    SHARED_CRITERIA,
    CriterionScores,
    format_match,
    groundedness,
    instruction_compliance,
    is_closed_domain,
    label_compliance,
    length_fit,
    prompt_echo,
    prompt_relevance,
    reference_agreement,
    score_completions,
    toxicity,
    truthfulness,
    truthfulqa_prompt_row,
)
from rlhf_lib.labelers.labeling import label_comparisons
from rlhf_lib.labelers.population import (
    DEFAULT_PREFERRED_WORDS,
    MIN_ANCHOR_WORDS,
    POPULATION_PRIORS,
    POPULATIONS,
    Labeler,
    make_population,
    with_noise,
)
from rlhf_lib.labelers.ranking import (
    FAILS_INSTRUCTION_BELOW,
    HALLUCINATES_BELOW,
    HARM_WORDS,
    INAPPROPRIATE_ABOVE,
    LIKERT_CEIL,
    LIKERT_FLOOR,
    TOXIC_ABOVE,
    competition_ranks,
    flags_from_scores,
    likert_from_utility,
)

__all__ = [
    "CLOSED_DOMAIN_CATEGORIES", "CRITERIA", "DEFAULT_PREFERRED_WORDS", "FAILS_INSTRUCTION_BELOW", "HALLUCINATES_BELOW",
    "HARM_WORDS", "INAPPROPRIATE_ABOVE", "LENGTH_GAP_FOR_ZERO", "LIKERT_CEIL", "LIKERT_FLOOR", "MIN_ANCHOR_WORDS",
    "POPULATIONS", "POPULATION_PRIORS", "SHARED_CRITERIA", "TOXIC_ABOVE", "AgreementEstimate", "AgreementReport",
    "CriterionScores", "Labeler", "agreement", "calibrate_noise", "competition_ranks", "flags_from_scores",
    "format_match", "groundedness", "instruction_compliance", "is_closed_domain", "label_comparisons",
    "label_compliance", "length_fit", "likert_from_utility", "make_population", "prompt_echo", "prompt_relevance",
    "reference_agreement", "score_completions", "toxicity", "truthfulness", "truthfulqa_prompt_row", "with_noise",
]
