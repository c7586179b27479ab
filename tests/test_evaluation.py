"""Tests of rlhf_lib.evaluation and rlhf_lib.plots: every metric on hand-made inputs with known answers.

Judges are fakes implementing the `Judge` protocol; the only model used is the random-init micro llama
(shapes, ranges, and that batched scoring equals one-at-a-time scoring). Runs in well under a minute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf_lib.evaluation import (
    ALL_METRICS,
    FLAG_KEYS,
    Judge,
    Metric,
    MetricResult,
    alignment_tax,
    bootstrap_ci,
    generalization,
    hallucination,
    overoptimization,
    preference,
    summary_rows,
    toxicity,
    truthfulness,
)
from rlhf_lib.evaluation import text as text_metrics
from rlhf_lib.evaluation.base import sort_frame, summarize
from rlhf_lib.evaluation.lm_scoring import continuation_logprobs, document_nll

# --------------------------------------------------------------------------------------------
# Fakes and fixtures
# --------------------------------------------------------------------------------------------


class KeywordJudge:
    """Prefers completions containing `good`; flags by keywords; Likert from the utility."""

    def __init__(self, good: str = "good") -> None:
        self.good = good

    def utility(self, prompt_row: Mapping[str, Any], completion: str) -> float:
        return 1.0 if self.good in completion else 0.0

    def likert(self, prompt_row: Mapping[str, Any], completion: str) -> int:
        return 7 if self.good in completion else 1

    def flags(self, prompt_row: Mapping[str, Any], completion: str) -> dict[str, bool]:
        return {
            "fails_instruction": completion.strip() == "",
            "hallucinates": "invented" in completion,
            "toxic": "idiot" in completion,
            "inappropriate_for_customer_assistant": "idiot" in completion,
        }


def prompt_rows(n: int, context: str = "") -> list[dict[str, Any]]:
    return [
        {"id": f"p{i}", "prompt": f"Question {i}?", "reference": "", "task": "t", "category": "open_qa",
         "source": "fixture", "context": context, "allowed_labels": [], "split": "eval"}
        for i in range(n)
    ]


def generations(rows: list[tuple[str, str, str]], n_prompts: int) -> pd.DataFrame:
    """rows: (method, size, completion) repeated for every prompt."""
    return pd.DataFrame(
        [{"method": m, "size": s, "prompt_id": f"p{i}", "completion": c} for m, s, c in rows for i in range(n_prompts)]
    )


@pytest.fixture(scope="module")
def micro():
    from rlhf_lib import models

    torch.manual_seed(0)
    return models.load_causal_lm("micro", device="cpu"), models.load_tokenizer("micro")


# --------------------------------------------------------------------------------------------
# base: metrics and the bootstrap
# --------------------------------------------------------------------------------------------


def test_metric_declarations_are_unique_and_valid():
    assert len(ALL_METRICS) >= 20
    for name, metric in ALL_METRICS.items():
        assert metric.name == name and metric.description
    assert ALL_METRICS["win_rate"].higher_is_better and not ALL_METRICS["hallucination_rate"].higher_is_better
    with pytest.raises(KeyError):
        Metric("x", "no_such_aggregation", True)
    assert isinstance(KeywordJudge(), Judge)


def test_bootstrap_degenerate_and_deterministic():
    assert bootstrap_ci([0.5] * 20, n_resamples=200, seed=0) == (0.5, 0.5)
    values = np.random.default_rng(1).normal(size=50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    low, high = bootstrap_ci(values, n_resamples=500, seed=0)
    assert low < values.mean() < high
    # A callable statistic takes the general path and agrees with the vectorised mean path closely.
    low2, high2 = bootstrap_ci(values, np.median, n_resamples=500, seed=0)
    assert low2 < np.median(values) < high2
    assert all(math.isnan(v) for v in bootstrap_ci([], n_resamples=10))
    assert summarize([]).n == 0


def test_bootstrap_covers_true_value_at_nominal_rate():
    # 200 samples of 100 Bernoulli(0.3) draws: the 95% percentile interval should cover 0.3 ~95% of the time.
    rng = np.random.default_rng(123)
    p, covered = 0.3, 0
    for rep in range(200):
        sample = (rng.random(100) < p).astype(float)
        low, high = bootstrap_ci(sample, "mean", n_resamples=500, seed=rep)
        covered += low <= p <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_ratio_of_sums_aggregation():
    per_doc = np.array([[2.0, 1.0], [6.0, 3.0]])  # token-weighted: 8 / 4 = 2, not mean(2, 2)
    result = ALL_METRICS["lm_nll"].compute(per_doc, n_resamples=100)
    assert result.value == pytest.approx(2.0) and result.n == 2
    ppl = ALL_METRICS["perplexity"].compute(np.array([[3.0, 1.0], [1.0, 3.0]]), n_resamples=100)
    assert ppl.value == pytest.approx(math.e)  # exp(4 / 4), where a mean of per-doc ratios gives exp(5/3)


# --------------------------------------------------------------------------------------------
# preference
# --------------------------------------------------------------------------------------------


def test_win_rate_perfect_worst_and_tie():
    prompts = prompt_rows(10)
    gens = generations(
        [("SFT", "tiny", "a plain answer"), ("PPO", "tiny", "a good answer"), ("GPT", "tiny", "meh"),
         ("DPO", "tiny", "a plain answer")],
        10,
    )
    table = preference.win_rate_table(gens, prompts, [KeywordJudge()], baseline_method="SFT", n_resamples=200)
    rates = table.set_index("method")["value"]
    assert rates["PPO"] == 1.0 and rates["GPT"] == 0.5 and rates["DPO"] == 0.5 and rates["SFT"] == 0.5
    assert (table["n"] == 10).all() and (table["baseline"] == "SFT@tiny").all()
    ppo = table.set_index("method").loc["PPO"]
    assert ppo["ci_low"] == ppo["ci_high"] == 1.0
    # Reverse: the baseline is the good one, the method always loses.
    gens2 = generations([("SFT", "tiny", "good"), ("PPO", "tiny", "bad")], 10)
    table2 = preference.win_rate_table(gens2, prompts, [KeywordJudge()], n_resamples=200)
    assert table2.set_index("method").at["PPO", "value"] == 0.0


def test_win_rate_identical_completions_tie_even_with_noisy_judge():
    class NoisyJudge(KeywordJudge):
        def __init__(self):
            self.rng = np.random.default_rng(0)

        def utility(self, prompt_row, completion):
            return float(self.rng.normal())

    gens = generations([("SFT", "tiny", "same"), ("PPO", "tiny", "same")], 8)
    table = preference.win_rate_table(gens, prompt_rows(8), [NoisyJudge()], n_resamples=100)
    assert (table["value"] == 0.5).all()


def test_win_rate_averages_over_judges_and_uses_largest_baseline():
    prompts = prompt_rows(6)
    gens = generations(
        [("SFT", "micro", "good x"), ("SFT", "small", "y"), ("PPO", "tiny", "good y"), ("PPO", "small", "x")], 6
    )
    judges = [KeywordJudge("good"), KeywordJudge("y")]
    per_prompt = preference.pairwise_scores(gens, prompts, judges, baseline_method="SFT")
    # Baseline is SFT@small ("y"): PPO@tiny "good y" wins for judge 1, ties for judge 2 -> 0.75.
    scores = per_prompt.groupby(["method", "size"])["score"].mean()
    assert scores[("PPO", "tiny")] == pytest.approx(0.75)
    assert scores[("PPO", "small")] == pytest.approx(0.5 * (0.5 + 0.0))  # tie for judge 1, loss for judge 2
    assert scores[("SFT", "small")] == 0.5
    with pytest.raises(KeyError):
        preference.pairwise_scores(gens, prompts[:3], judges)  # generations for prompts without rows


def test_likert_and_flags_known_values():
    prompts = prompt_rows(5)
    gens = generations([("PPO", "tiny", "good"), ("GPT", "tiny", "you idiot, invented facts")], 5)
    table = preference.likert_and_flag_table(gens, prompts, [KeywordJudge()], n_resamples=100)
    got = table.set_index(["method", "metric"])["value"]
    assert got[("PPO", "likert")] == 7 and got[("GPT", "likert")] == 1
    assert got[("GPT", "toxic")] == 1.0 and got[("GPT", "hallucinates")] == 1.0 and got[("PPO", "toxic")] == 0.0
    assert set(table["metric"]) == {"likert", *FLAG_KEYS}
    assert list(dict.fromkeys(table["method"])) == ["GPT", "PPO"]  # canonical method order

    class BadJudge(KeywordJudge):
        def flags(self, prompt_row, completion):
            return {"toxic": False}

    with pytest.raises(KeyError, match="flags lack"):
        preference.likert_and_flag_table(gens, prompts, [BadJudge()], n_resamples=10)


# --------------------------------------------------------------------------------------------
# truthfulness
# --------------------------------------------------------------------------------------------

TQA_ROWS = [
    {"id": "q1", "question": "What colour is the sky?", "best_answer": "The sky is blue",
     "correct_answers": ["Blue", "The sky is blue"], "incorrect_answers": ["The sky is green", "Red"],
     "mc_choices": ["Blue", "Green", "Red"], "mc_labels": [1, 0, 0], "source": "fixture"},
    {"id": "q2", "question": "Do cats bark?", "best_answer": "No, cats do not bark",
     "correct_answers": ["No, cats meow"], "incorrect_answers": ["Yes, cats bark loudly"],
     "mc_choices": ["Yes, they bark", "No, cats meow", "No, they do not"], "mc_labels": [0, 1, 1], "source": "fixture"},
]


def test_mc_perfect_worst_and_uniform_scorers():
    truthful = lambda q, choices: [0.0 if r else -50.0 for r in next(x for x in TQA_ROWS if x["question"] == q)["mc_labels"]]  # noqa: E731
    liar = lambda q, choices: [-50.0 if r else 0.0 for r in next(x for x in TQA_ROWS if x["question"] == q)["mc_labels"]]  # noqa: E731
    uniform = lambda q, choices: [0.0] * len(choices)  # noqa: E731
    best, per_item = truthfulness.truthfulqa_mc(TQA_ROWS, truthful, n_resamples=100)
    assert best["mc1"].value == 1.0 and best["mc2"].value == pytest.approx(1.0)
    assert list(per_item.columns) == ["id", "n_choices", "mc1", "mc2", "chosen"]
    worst, _ = truthfulness.truthfulqa_mc(TQA_ROWS, liar, n_resamples=100)
    assert worst["mc1"].value == 0.0 and worst["mc2"].value == pytest.approx(0.0, abs=1e-9)
    flat, _ = truthfulness.truthfulqa_mc(TQA_ROWS, uniform, n_resamples=100)
    # Ties share credit: q1 1/3 true, q2 2/3 true -> MC1 = MC2 = 0.5 (argmax's first index would give 0.5 by luck).
    assert flat["mc1"].value == pytest.approx(0.5) and flat["mc2"].value == pytest.approx(0.5)
    assert truthfulness.mc_scores([math.log(0.75), math.log(0.25)], [1, 0]) == pytest.approx((1.0, 0.75))


def test_generated_true_and_informative():
    answers = ["The sky is blue.", "Yes, cats bark loudly"]
    summary, per_item = truthfulness.truthfulqa_generated(TQA_ROWS, answers, n_resamples=100)
    assert per_item["true"].tolist() == [1.0, 0.0]
    assert summary["informative"].value == 1.0 and summary["true_informative"].value == 0.5
    refusals, _ = truthfulness.truthfulqa_generated(TQA_ROWS, ["I have no comment.", ""], n_resamples=100)
    assert refusals["true"].value == 1.0 and refusals["informative"].value == 0.0
    assert refusals["true_informative"].value == 0.0
    strict, _ = truthfulness.truthfulqa_generated(TQA_ROWS, ["I don't know", "No comment"], refusal_is_true=False, n_resamples=10)
    assert strict["true"].value == 0.0
    # Unrelated text is informative but not true (no similarity to either side: no credit).
    assert not truthfulness.is_true("Quantum physics", ["Blue"], ["Green"])
    assert truthfulness.is_true("blue sky", ["blue"], ["green"], similarity="rouge_l")


def test_lm_scoring_batched_equals_single_and_manual(micro):
    model, tok = micro
    contexts = ["Question: what is two plus two?\nAnswer:", "Hi", "A much longer context with many more words in it."]
    conts = [" four", " there, how are you today", " ok"]
    sums, counts = continuation_logprobs(model, tok, contexts, conts, batch_size=3)
    for i in range(3):
        single, n = continuation_logprobs(model, tok, [contexts[i]], [conts[i]], batch_size=1)
        assert single[0] == pytest.approx(sums[i], abs=1e-4) and n[0] == counts[i]
    # Manual: unpadded forward pass, sum of log-probs of the continuation tokens.
    ctx_ids = tok(contexts[1], add_special_tokens=False)["input_ids"]
    cont_ids = tok(conts[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx_ids + cont_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    manual = sum(float(logp[len(ctx_ids) + j - 1, t]) for j, t in enumerate(cont_ids))
    assert sums[1] == pytest.approx(manual, abs=1e-4) and counts[1] == len(cont_ids)
    assert (sums < 0).all()
    # A model whose config caps its logits after the head runs whole, its logits kept from the first scored column
    # (the micro model applies no cap itself, so the numbers must not move).
    model.config.final_logit_softcapping = 30.0
    try:
        capped, capped_counts = continuation_logprobs(model, tok, contexts, conts, batch_size=3)
    finally:
        model.config.final_logit_softcapping = None
    np.testing.assert_allclose(capped, sums, atol=1e-4)
    assert (capped_counts == counts).all()


def test_mc_on_micro_model(micro):
    model, tok = micro
    scorer = truthfulness.lm_choice_scorer(model, tok, batch_size=4)
    summary, per_item = truthfulness.truthfulqa_mc(TQA_ROWS, scorer, n_resamples=100)
    assert per_item.shape == (2, 5) and per_item["n_choices"].tolist() == [3, 3]
    for name in ("mc1", "mc2"):
        result = summary[name]
        assert 0.0 <= result.ci_low <= result.value <= result.ci_high <= 1.0 and result.n == 2


# --------------------------------------------------------------------------------------------
# toxicity and hallucination
# --------------------------------------------------------------------------------------------

TOXIC = ["you are a stupid fucking idiot", "shut up you worthless piece of shit"]
CLEAN = ["Thank you, have a lovely day.", "The museum opens at nine in the morning."]


def test_toxic_rate_real_classifier():
    assert toxicity.toxic_rate(TOXIC, n_resamples=100).value == 1.0
    assert toxicity.toxic_rate(CLEAN, n_resamples=100).value == 0.0
    assert toxicity.toxic_rate(TOXIC + CLEAN, n_resamples=100).value == 0.5


def test_toxicity_conditions_and_table():
    rows = [{"id": "t1", "prompt": "So I told him", "kind": "probe", "source": "fixture"}]
    conds = toxicity.build_conditions(rows)
    assert conds["condition"].tolist() == ["plain", "respectful"]
    assert conds["prompt"].iloc[1].startswith(toxicity.RESPECTFUL_INSTRUCTION) and conds["prompt"].iloc[1].endswith("So I told him")
    assert toxicity.plain_prompt("x") == f"{toxicity.BASIC_INSTRUCTION} x"
    gens = pd.DataFrame(
        [{"method": "PPO", "size": "tiny", "condition": c, "prompt_id": f"t{i}", "completion": text}
         for c, texts in (("plain", TOXIC + CLEAN), ("respectful", CLEAN + CLEAN)) for i, text in enumerate(texts)]
    )
    table = toxicity.toxicity_table(gens, n_resamples=100)
    rate = table[table["metric"] == "toxic_rate"].set_index("condition")["value"]
    assert rate["plain"] == 0.5 and rate["respectful"] == 0.0
    effect = toxicity.respectful_effect(table)
    assert effect["relative_reduction"].iloc[0] == pytest.approx(1.0)
    # An injected scorer replaces the classifier.
    assert toxicity.toxic_rate(["a", "b"], scorer=lambda texts: [0.9, 0.1], n_resamples=10).value == 0.5


def test_hallucination_rate_only_closed_domain():
    prompts = prompt_rows(4, context="Paris is the capital of France.") + [
        {**row, "id": f"open{i}"} for i, row in enumerate(prompt_rows(3))
    ]
    gens = pd.DataFrame(
        [{"method": "GPT", "size": "tiny", "prompt_id": p["id"], "completion": "invented facts"} for p in prompts]
        + [{"method": "PPO", "size": "tiny", "prompt_id": p["id"], "completion": "Paris"} for p in prompts]
    )
    table = hallucination.hallucination_table(gens, prompts, [KeywordJudge()], n_resamples=100)
    got = table.set_index("method")
    assert got.at["GPT", "value"] == 1.0 and got.at["PPO", "value"] == 0.0
    assert (table["n"] == 4).all()  # the three open-domain prompts are excluded
    with pytest.raises(ValueError, match="closed-domain"):
        hallucination.hallucination_table(gens, prompts, [KeywordJudge()], categories=["summarization"])


# --------------------------------------------------------------------------------------------
# alignment tax
# --------------------------------------------------------------------------------------------


def test_squad_normalisation_f1_em():
    assert text_metrics.normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert text_metrics.squad_exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert text_metrics.squad_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert text_metrics.squad_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert text_metrics.squad_f1("in Paris, France", ["London", "Paris"]) == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    assert text_metrics.squad_f1("Berlin", ["Paris"]) == 0.0
    assert text_metrics.rouge_l("x b c d", "x c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert text_metrics.rouge_l("a b c d", "a c d") == pytest.approx(0.8)  # "a" is an article: dropped
    scored = alignment_tax.score_squad(["Paris", "no idea"], [{"id": "1", "answers": ["Paris"]}, {"id": "2", "answers": ["Rome"]}])
    assert scored["f1"].tolist() == [1.0, 0.0] and scored["em"].tolist() == [1.0, 0.0]


QA = [
    {"id": f"s{i}", "context": ctx, "question": q, "answers": [a], "subset": "squad", "source": "fixture"}
    for i, (ctx, q, a) in enumerate(
        [
            ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
            ("The Nile flows through Egypt.", "Which river flows through Egypt?", "The Nile"),
            ("Water boils at 100 degrees Celsius.", "At what temperature does water boil?", "100 degrees Celsius"),
        ]
    )
]


def test_few_shot_prompt_uses_other_items():
    for i in range(len(QA)):
        shots = alignment_tax.select_shots(QA, i, k=2, seed=0)
        assert i not in shots and len(set(shots)) == 2
    prompt = alignment_tax.build_squad_prompt(QA[0], [QA[1]])
    assert prompt.endswith("Question: What is the capital of France?\nAnswer:")
    assert "Answer: The Nile\n\n" in prompt and "Paris is the capital" in prompt
    assert alignment_tax.extract_answer("\n  Paris\n\nContext: ...") == "Paris"
    with pytest.raises(ValueError):
        alignment_tax.select_shots(QA, 0, k=3)


def test_squad_and_lm_loss_on_micro_model(micro):
    model, tok = micro
    summary, per_item = alignment_tax.squad_few_shot(model, tok, QA, k=1, max_new_tokens=4, n_resamples=50)
    assert len(per_item) == 3 and {"prediction", "f1", "em", "prompt"} <= set(per_item.columns)
    assert 0.0 <= summary["squad_f1"].value <= 1.0 and 0.0 <= summary["squad_em"].value <= summary["squad_f1"].value + 1e-9
    assert tok.truncation_side == "right"  # restored after the left-truncating call
    texts = [q["context"] for q in QA]
    loss = alignment_tax.lm_loss(model, tok, texts, max_tokens=64, n_resamples=50)
    sums, counts = document_nll(model, tok, texts, max_tokens=64)
    assert loss["lm_nll"].value == pytest.approx(sums.sum() / counts.sum())
    assert loss["perplexity"].value == pytest.approx(math.exp(loss["lm_nll"].value), rel=1e-6)
    # A random-init model is close to uniform over the 49k vocabulary: NLL near ln(49152) ~ 10.8.
    assert 8.0 < loss["lm_nll"].value < 13.0 and loss["lm_nll"].n == 3


# --------------------------------------------------------------------------------------------
# over-optimisation and generalisation
# --------------------------------------------------------------------------------------------


def test_overoptimization_table_and_summary():
    d = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    rng = np.random.default_rng(0)
    gold = [list(x * (2 - x) + rng.normal(0, 0.01, 30)) for x in d]  # peaks at d = 1
    rm = [list(2 * x + rng.normal(0, 0.01, 30)) for x in d]  # keeps rising
    shuffled = overoptimization.overoptimization_table([20, 0, 10], [5.0, 1.0, 3.0], [0.0, 0.0, 1.0], [4.0, -0.1, 1.0])
    assert list(shuffled.columns) == overoptimization.TABLE_COLUMNS
    assert shuffled["step"].tolist() == [0, 10, 20] and shuffled["rm_score"].tolist() == [1.0, 3.0, 5.0]
    assert shuffled["sqrt_kl"].tolist() == [0.0, 1.0, 2.0]  # a slightly negative KL estimate clips to 0
    table = overoptimization.overoptimization_table([0, 10, 20, 30, 40], rm, gold, list(d**2), n_resamples=100)
    assert table["sqrt_kl"].tolist() == pytest.approx(d.tolist())
    summary = overoptimization.overoptimization_summary(table)
    assert summary["peak_gold_step"] == 20 and summary["overoptimized"]
    assert summary["fit_alpha"] == pytest.approx(2.0, abs=0.05) and summary["fit_beta"] == pytest.approx(1.0, abs=0.05)
    assert summary["fit_peak_sqrt_kl"] == pytest.approx(1.0, abs=0.05)
    # Gold utility that tracks the RM: no over-optimisation, peak at the end.
    honest = overoptimization.overoptimization_table([0, 1, 2], [[0.0], [1.0], [2.0]], [[0.0], [0.5], [1.0]], [0.0, 1.0, 4.0])
    s2 = overoptimization.overoptimization_summary(honest)
    assert not s2["overoptimized"] and s2["peak_gold_step"] == 2 and s2["spearman_rm_gold"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        overoptimization.overoptimization_table([0, 1], [1.0], [1.0, 2.0], [0.0, 1.0])


def test_rm_accuracy_perfect_worst_ties_and_sets():
    assert generalization.pairwise_accuracy([2, 3, 4], [1, 1, 1], n_resamples=50).value == 1.0
    assert generalization.pairwise_accuracy([0, 0, 0], [1, 1, 1], n_resamples=50).value == 0.0
    assert generalization.pairwise_accuracy([1, 1], [1, 1], n_resamples=50).value == 0.5
    preds = pd.DataFrame(
        {"set": ["hhh/honest"] * 2 + ["heldout_labelers"] * 4 + ["train_labelers"] * 4,
         "score_chosen": [1, 0, 1, 1, 0, 0, 1, 1, 1, 1],
         "score_rejected": [0, 1, 0, 0, 1, 1, 0, 0, 0, 0]}
    )
    table = generalization.rm_accuracy_table(preds, n_resamples=100)
    assert table["set"].tolist() == ["train_labelers", "heldout_labelers", "hhh/honest"]
    assert table["value"].tolist() == [1.0, 0.5, 0.5] and table["n"].tolist() == [4, 4, 2]
    assert ((table["ci_low"] <= table["value"]) & (table["value"] <= table["ci_high"])).all()


def test_summary_rows_and_sort_frame():
    rows = summary_rows({"mc1": MetricResult(0.5, 0.4, 0.6, 10)}, method="PPO", size="tiny")
    assert rows == [{"method": "PPO", "size": "tiny", "metric": "mc1", "higher_is_better": True,
                     "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}]
    frame = pd.DataFrame({"method": ["PPO", "zzz", "GPT", "PPO"], "size": ["small", "tiny", "tiny", "micro"]})
    assert sort_frame(frame).values.tolist() == [["GPT", "tiny"], ["PPO", "micro"], ["PPO", "small"], ["zzz", "tiny"]]


# --------------------------------------------------------------------------------------------
# plots: each writes a PNG and its CSV
# --------------------------------------------------------------------------------------------


def _rows(**columns):
    return pd.DataFrame(columns)


def _ci(frame: pd.DataFrame, half: float = 0.05) -> pd.DataFrame:
    return frame.assign(ci_low=frame["value"] - half, ci_high=frame["value"] + half, n=20)


def test_every_plot_writes_png_and_csv(tmp_path):
    import matplotlib.pyplot as plt

    from rlhf_lib import plots

    methods = ["GPT", "SFT", "PPO", "PPO-ptx"]
    win = _ci(pd.DataFrame([{"method": m, "size": s, "metric": "win_rate", "value": v, "baseline": "SFT@small"}
                            for m, base in zip(methods, [0.2, 0.45, 0.6, 0.65], strict=True)
                            for s, v in (("micro", base - 0.1), ("tiny", base), ("small", base + 0.05))]))
    meta = _ci(pd.DataFrame([{"method": m, "size": s, "metric": k, "value": 4.0 if k == "likert" else 0.3}
                             for m in methods for s in ("tiny", "small") for k in ("likert", *FLAG_KEYS)]))
    truth = _ci(pd.DataFrame([{"method": m, "size": "tiny", "metric": k, "value": 0.4}
                              for m in methods for k in ("mc1", "mc2", "true", "informative", "true_informative")]))
    tox = _ci(pd.DataFrame([{"method": m, "size": "tiny", "condition": c, "metric": "toxic_rate", "value": v}
                            for m in methods for c, v in (("plain", 0.2), ("respectful", 0.15))]), 0.03)
    hall = _ci(pd.DataFrame([{"method": m, "size": "tiny", "metric": "hallucination_rate", "value": 0.3} for m in methods]))
    tax = _ci(pd.DataFrame([{"method": m, "size": "tiny", "metric": k, "value": v}
                            for m in ("GPT", "PPO", "PPO-ptx") for k, v in (("squad_f1", 0.5), ("squad_em", 0.3), ("lm_nll", 3.2))]))
    d = np.linspace(0, 2, 6)
    over = pd.concat(
        [overoptimization.overoptimization_table(list(range(6)), [[2 * x, 2 * x + 0.1] for x in d],
                                                 [[x * (2 - x), x * (2 - x) + 0.1] for x in d], list(d**2), n_resamples=20)
         .assign(method=m) for m in ("PPO", "PPO-ptx")]
    )
    rm = _ci(pd.DataFrame({"set": ["train_labelers", "heldout_labelers", "hhh/harmless"], "metric": "rm_accuracy",
                           "value": [0.7, 0.68, 0.6]}))
    ppo_log = pd.DataFrame({"iteration": range(25), "reward": np.linspace(0, 1, 25), "kl": np.linspace(0, 3, 25),
                            "entropy": 2.0, "clip_fraction": 0.1, "value_loss": 0.5, "ptx_loss": 3.0})
    ppo_csv = tmp_path / "ppo_metrics.csv"
    ppo_log.to_csv(ppo_csv, index=False)
    sft_log = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [3.0, 2.5, np.nan, 2.0], "eval_loss": [np.nan, 2.8, 2.6, np.nan]})
    mix = {"generation": 10, "open_qa": 5, "closed_qa": 8, "my_extra": 1}

    calls = {
        "win": lambda p: plots.plot_win_rates(win, p),
        "meta": lambda p: plots.plot_likert_and_flags(meta, p),
        "truth": lambda p: plots.plot_truthfulness(truth, p),
        "tox": lambda p: plots.plot_toxicity(tox, p),
        "hall": lambda p: plots.plot_hallucination(hall, p),
        "tax": lambda p: plots.plot_alignment_tax(tax, p),
        "over": lambda p: plots.plot_overoptimization(over, p),
        "rm": lambda p: plots.plot_rm_accuracy(rm, p),
        "ppo": lambda p: plots.plot_ppo_curves(ppo_csv, p),
        "sft": lambda p: plots.plot_sft_curves(sft_log, p),
        "mix": lambda p: plots.plot_category_mix(mix, p),
    }
    for name, call in calls.items():
        png = call(tmp_path / "figs" / f"{name}.png")
        assert png == tmp_path / "figs" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000, name
        data = pd.read_csv(png.with_suffix(".csv"))
        assert len(data) > 0, name
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{n}.{ext}" for n in calls for ext in ("png", "csv")
    )  # no temporary files left behind
    mix_csv = pd.read_csv(tmp_path / "figs" / "mix.csv").set_index("category")
    assert mix_csv.at["generation", "paper_percent"] == 45.6 and mix_csv["ours_percent"].sum() == pytest.approx(100)
    assert plt.get_fignums() == []  # no pyplot state touched
    with pytest.raises(KeyError):
        plots.plot_ppo_curves(pd.DataFrame({"step": [1], "nothing": [0]}), tmp_path / "bad.png")


def test_win_rate_uses_batched_utilities_consistently():
    class BatchedJudge(KeywordJudge):
        calls = 0

        def utilities(self, prompt_row, completions):
            BatchedJudge.calls += 1
            return [self.utility(prompt_row, c) for c in completions]

    gens = generations([("SFT", "tiny", "plain"), ("PPO", "tiny", "good"), ("GPT", "tiny", "bad")], 5)
    batched = preference.pairwise_scores(gens, prompt_rows(5), [BatchedJudge()])
    single = preference.pairwise_scores(gens, prompt_rows(5), [KeywordJudge()])
    assert BatchedJudge.calls == 5  # one call per prompt, not per completion
    pd.testing.assert_frame_equal(batched, single)


def test_sft_curve_draws_the_per_step_loss_not_the_trainers_one_summary_value(tmp_path):
    """A Trainer's log history: `loss` every step, `eval_loss` per epoch, `train_loss` once in the summary row."""
    from rlhf_lib import plots

    history = pd.DataFrame({"step": [1, 2, 3, 4, 4, 4], "loss": [2.0, 1.8, 1.7, 1.6, None, None],
                            "eval_loss": [None, None, None, None, 1.9, None], "train_loss": [None] * 5 + [1.78]})
    plots.plot_sft_curves(history, tmp_path / "sft.png")
    drawn = pd.read_csv(tmp_path / "sft.csv")
    assert "loss" in drawn and "train_loss" not in drawn and drawn["loss"].notna().sum() == 4


def test_ppo_curves_overlay_the_runs_and_keep_each_runs_data(tmp_path):
    from rlhf_lib import plots

    ppo = pd.DataFrame({"iteration": range(1, 31), "rm_score": np.linspace(0, 1, 30), "kl": np.linspace(0, 2, 30)})
    ptx = pd.DataFrame({"iteration": range(1, 6), "rm_score": [0.1] * 5, "ptx_loss": [3.0, 2.9, 2.9, 2.8, 2.8]})
    plots.plot_ppo_curves({"PPO": ppo, "PPO-ptx": ptx}, tmp_path / "ppo.png")
    drawn = pd.read_csv(tmp_path / "ppo.csv")
    assert drawn.groupby("run").size().to_dict() == {"PPO": 30, "PPO-ptx": 5}
    assert drawn.loc[drawn["run"] == "PPO", "ptx_loss"].isna().all()  # a panel only one run has
    single = plots.plot_ppo_curves(ppo, tmp_path / "one.png")  # one run's log still works
    assert set(pd.read_csv(single.with_suffix(".csv"))["run"]) == {"PPO"}
