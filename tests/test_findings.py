"""findings.json: honest intervals (prompts resampled, Wilson for proportions), verdicts, the validator, the writer."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlhf_lib import paper
from rlhf_lib.evaluation import generalization
from rlhf_lib.evaluation.stats import (
    clopper_pearson_interval,
    cluster_ratio,
    clustered_accuracy,
    paired_bootstrap,
    proportion,
    verdict,
    wilson_interval,
)
from rlhf_lib.findings import (
    FINDINGS_FILE,
    FIXED_BY_DESIGN,
    SPECS,
    build_findings,
    findings_table,
    load_findings,
    validate_findings,
    write_findings,
)

REPO = Path(__file__).resolve().parents[1]
Z2 = 1.959963984540054**2  # z^2 of a 95% interval


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_wilson_matches_hand_computed_values_and_never_has_zero_width():
    # At 0/n the Wilson interval is [0, z^2 / (n + z^2)]; at n/n it is [n / (n + z^2), 1].
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z2 / (10 + Z2)) and high == pytest.approx(0.27753, abs=1e-5)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + Z2)) and low == pytest.approx(0.72247, abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)  # the textbook 5/10 example
    one = proportion(1, 1)
    assert one.value == 1.0 and one.ci_high == 1.0 and one.ci_low == pytest.approx(1 / (1 + Z2)) and one.n == 1
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_clopper_pearson_matches_hand_computed_values_and_is_wider_than_wilson():
    # At 0/n the exact upper bound solves (1 - p)^n = alpha / 2; at n/n the lower bound solves p^n = alpha / 2.
    low, high = clopper_pearson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10)) and high == pytest.approx(0.30850, abs=1e-5)
    low, high = clopper_pearson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10)) and low == pytest.approx(0.69150, abs=1e-5)
    assert clopper_pearson_interval(5, 10) == pytest.approx((0.18709, 0.81291), abs=1e-5)  # textbook 5/10
    assert clopper_pearson_interval(3, 10) == pytest.approx((0.06674, 0.65245), abs=1e-5)
    for k in (0, 3, 5, 10):  # exact coverage costs width: it contains Wilson's interval here
        (cp_low, cp_high), (w_low, w_high) = clopper_pearson_interval(k, 10), wilson_interval(k, 10)
        assert cp_low <= w_low and cp_high >= w_high and cp_high > cp_low
    exact = proportion(0, 10, method="clopper-pearson")
    assert (exact.value, exact.ci_low, exact.n) == (0.0, 0.0, 10) and exact.ci_high == pytest.approx(0.30850, abs=1e-5)
    with pytest.raises(ValueError):
        clopper_pearson_interval(11, 10)
    with pytest.raises(ValueError):
        proportion(1, 10, method="normal")


def _correlated_items(n: int = 60, effect: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two methods scored on the same items: item difficulty, shared by both, dominates the scores."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 1.0, n)
    return difficulty + effect + rng.normal(0.0, 0.1, n), difficulty + rng.normal(0.0, 0.1, n)


def test_paired_bootstrap_covers_a_known_difference_and_excludes_zero_only_for_a_real_one():
    a, b = _correlated_items(effect=0.3)
    paired = paired_bootstrap(a, b, n_resamples=2000, seed=0)
    assert paired.n == 60 and paired.value == pytest.approx(np.mean(a - b))
    assert paired.ci_low < 0.3 < paired.ci_high and paired.ci_low > 0  # covers the truth, excludes no effect
    assert paired_bootstrap(a - b, n_resamples=2000, seed=0) == paired  # per-item differences give the same
    null_a, null_b = _correlated_items(effect=0.0, seed=1)
    null = paired_bootstrap(null_a, null_b, n_resamples=2000, seed=0)
    assert null.ci_low < 0 < null.ci_high
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros((3, 2)))


def test_pairing_gives_a_narrower_interval_than_an_unpaired_bootstrap_on_correlated_items():
    a, b = _correlated_items(effect=0.3)
    paired = paired_bootstrap(a, b, n_resamples=2000, seed=0)
    rng = np.random.default_rng(0)  # unpaired: each method's items resampled on their own
    unpaired = [a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean() for _ in range(2000)]
    unpaired_low, unpaired_high = np.quantile(unpaired, [0.025, 0.975])
    assert unpaired_low < 0 < unpaired_high  # the shared difficulty swamps the effect unless items are paired
    assert paired.ci_high - paired.ci_low < (unpaired_high - unpaired_low) / 5


def test_paired_bootstrap_with_no_spread_gets_a_bound_not_zero_width():
    # 16 prompts, neither method ever toxic: every difference is 0, so the bootstrap alone says [0, 0].
    assert paired_bootstrap(np.zeros(16), np.zeros(16)).ci_low == paired_bootstrap(np.zeros(16), np.zeros(16)).ci_high
    bound = 1 - 0.025 ** (1 / 16)  # at most this share of prompts could differ (Clopper-Pearson, 0 of 16 seen)
    tied = paired_bootstrap(np.zeros(16), np.zeros(16), bounds=(-1.0, 1.0))
    assert (tied.value, tied.n) == (0.0, 16) and (tied.ci_low, tied.ci_high) == pytest.approx((-bound, bound))
    # A constant difference near a bound has little room on that side.
    shifted = paired_bootstrap(np.full(16, 0.5), bounds=(-1.0, 1.0))
    assert (shifted.ci_low, shifted.ci_high) == pytest.approx((0.5 - 1.5 * bound, 0.5 + 0.5 * bound))
    spread = paired_bootstrap([1.0, 0.0, 0.0, 0.5], bounds=(-1.0, 1.0))  # spread: the bootstrap interval is kept
    assert spread == paired_bootstrap([1.0, 0.0, 0.0, 0.5])


def _clustered_predictions(prompts: int = 10, pairs: int = 20, correct_prompts: int = 6) -> pd.DataFrame:
    """Pairs that are clustered by prompt: every pair of a prompt is right, or every pair is wrong."""
    rows = []
    for p in range(prompts):
        right = p < correct_prompts
        for _ in range(pairs):
            rows.append({"set": "heldout_labelers", "prompt_id": f"p{p}", "score_chosen": 1.0 if right else 0.0,
                         "score_rejected": 0.0 if right else 1.0})
    return pd.DataFrame(rows)


def test_rm_accuracy_interval_resamples_prompts_and_is_wider_than_a_pair_level_one():
    preds = _clustered_predictions()
    pair_level = generalization.pairwise_accuracy(preds["score_chosen"], preds["score_rejected"], n_resamples=2000)
    prompt_level = generalization.pairwise_accuracy(preds["score_chosen"], preds["score_rejected"], n_resamples=2000,
                                                    prompt_ids=preds["prompt_id"])
    assert pair_level.value == prompt_level.value == pytest.approx(0.6)
    assert pair_level.n == 200 and prompt_level.n == 10
    pair_width, prompt_width = pair_level.ci_high - pair_level.ci_low, prompt_level.ci_high - prompt_level.ci_low
    # 10 independent prompts know far less than 200 independent pairs would: about sqrt(20) times wider.
    assert prompt_width > 2.5 * pair_width, (pair_width, prompt_width)
    assert prompt_level.ci_low < 0.5 < prompt_level.ci_high  # chance is not excluded by 6 of 10 prompts
    table = generalization.rm_accuracy_table(preds, n_resamples=500)
    assert table["n"].tolist() == [10] and table["n_pairs"].tolist() == [200]
    assert table["ci_high"].iloc[0] - table["ci_low"].iloc[0] > 2.5 * pair_width
    # Without prompt ids there is nothing to cluster: pairs are the unit, as for HHH's one-pair prompts.
    assert generalization.rm_accuracy_table(preds.drop(columns="prompt_id"), n_resamples=100)["n"].tolist() == [200]


def test_cluster_ratio_pools_and_is_seeded():
    result = cluster_ratio([3, 0, 2], [3, 2, 5], n_resamples=300, seed=1)
    assert result.value == pytest.approx(5 / 10) and result.n == 3 and result.ci_low < 0.5 < result.ci_high
    assert cluster_ratio([3, 0, 2], [3, 2, 5], n_resamples=300, seed=1) == result
    grouped = clustered_accuracy([1, 1, 1, 0, 0], ["a", "a", "a", "b", "b"], n_resamples=200)
    assert grouped.value == pytest.approx(0.6) and grouped.n == 2


@pytest.mark.parametrize(("low", "high", "side", "expected"), [
    (55.0, 70.0, "above", "agrees"),          # wholly on the paper's side of no effect
    (30.0, 45.0, "above", "disagrees"),       # wholly on the other side
    (45.0, 70.0, "above", "inconclusive"),    # covers no effect
    (50.0, 70.0, "above", "inconclusive"),    # touching no effect decides nothing
    (30.0, 45.0, "below", "agrees"),
    (55.0, 70.0, "below", "disagrees"),
    (40.0, 60.0, "below", "inconclusive"),
])
def test_verdict_branches(low, high, side, expected):
    assert verdict(low, high, no_effect=50.0, side=side) == expected


def test_too_few_resampled_units_decide_nothing():
    # A bootstrap over 2 prompts gave [55, 58] at micro: narrow because it can see only 3 resamples, not because it is sure.
    assert verdict(55.0, 58.0, no_effect=50.0, side="above", n=2) == "inconclusive"
    assert verdict(55.0, 58.0, no_effect=50.0, side="above", n=40) == "agrees"
    assert verdict(40.0, 45.0, no_effect=50.0, side="above", n=9) == "inconclusive"


def test_rm_accuracy_no_effect_is_chance_even_far_below_the_papers_number():
    # 55-60% is well below the paper's 72.4% but above chance: the effect (an RM better than chance) agrees.
    assert paper.RM_ACCURACY_TRAIN.no_effect == 50.0 and paper.RM_ACCURACY_TRAIN.value == 72.4
    assert paper.RM_ACCURACY_HELDOUT.value == 69.6
    assert verdict(55.0, 60.0, paper.RM_ACCURACY_TRAIN.no_effect, paper.RM_ACCURACY_TRAIN.side) == "agrees"


# --------------------------------------------------------------------------------------------
# The record, from toy results
# --------------------------------------------------------------------------------------------

N_PROMPTS = 20
N_ITEMS = 16  # questions / prompts of the per-item tables
TOXIC_TEXT, CLEAN_TEXT = "you are a stupid fucking idiot", "Thank you, have a lovely day."


def _per_item_tables(folder: Path, methods: list[str]) -> None:
    """Per-item tables with known paired differences (every method answers the same N_ITEMS items)."""
    squad = {"GPT": [1.0] * N_ITEMS, "SFT": [1.0] * 8 + [0.0] * 8, "PPO": [0.0] * 12 + [1.0] * 4,
             "PPO-ptx": [0.0] * 12 + [1.0] * 4}  # PPO: 75 F1 points below GPT; PPO-ptx answers exactly as PPO
    truthful = {"GPT": [1.0] * 12 + [0.0] * 4, "SFT": [1.0] * 12 + [0.0] * 4, "PPO": [1.0] * 12 + [0.0] * 4,
                "PPO-ptx": [0.0] * N_ITEMS}  # PPO-ptx 75 points below GPT: the paper's opposite
    toxic = {"GPT": [True] * 8 + [False] * 8, "SFT": [False] * N_ITEMS, "PPO": [False] * N_ITEMS,
             "PPO-ptx": [False] * N_ITEMS}
    flagged = {"GPT": [1.0] * 9 + [0.0] * 3, "SFT": [0.5] * 12, "PPO": [1.0] * 9 + [0.0] * 3, "PPO-ptx": [0.0] * 12}
    squad_rows, tqa_rows, tox_rows, hall_rows = [], [], [], []
    for m in methods:
        for i in range(N_ITEMS):
            squad_rows.append({"id": f"sq{i}", "prediction": "x", "f1": squad[m][i], "em": squad[m][i], "method": m,
                               "size": "tiny"})
            tqa_rows.append({"id": f"tq{i}", "true_informative": truthful[m][i], "method": m, "size": "tiny"})
            tox_rows.append({"prompt_id": f"tox{i}", "condition": "respectful", "method": m, "size": "tiny",
                             "completion": TOXIC_TEXT if toxic[m][i] else CLEAN_TEXT})
            # The plain condition must be ignored: here PPO-ptx is always toxic.
            tox_rows.append({"prompt_id": f"tox{i}", "condition": "plain", "method": m, "size": "tiny",
                             "completion": TOXIC_TEXT if m == "PPO-ptx" else CLEAN_TEXT})
        hall_rows += [{"method": m, "size": "tiny", "prompt_id": f"c{i}", "hallucinates": v} for i, v in enumerate(flagged[m])]
    pd.DataFrame(squad_rows).to_csv(folder / "analysis_squad_per_item.csv", index=False)
    pd.DataFrame(tqa_rows).to_csv(folder / "analysis_truthfulqa_per_item.csv", index=False)
    pd.DataFrame(tox_rows).to_csv(folder / "analysis_toxicity_generations.csv", index=False)
    pd.DataFrame(hall_rows).to_csv(folder / "analysis_hallucination_per_item.csv", index=False)


def _toy_results(folder: Path, ppo: bool = True, win_degenerate: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    agreement = {"train-train": {"value": 0.73, "ci_low": 0.71, "ci_high": 0.75, "n": 30},
                 "heldout-heldout": {"value": 0.76, "ci_low": 0.74, "ci_high": 0.78, "n": 30}}
    (folder / "metrics.json").write_text(json.dumps({"preset": "tiny", "seed": 0, "fingerprint": "f00",
                                                     "counts": {"best_of_n": 16, "eval_prompts": N_PROMPTS},
                                                     "labeler_agreement": agreement}))
    methods = {"best-of-n": (0.6, 0.52, 0.68), "PPO": (0.125, 0.05, 0.2), "PPO-ptx": (0.55, 0.4, 0.7),
               "SFT": (0.5, 0.5, 0.5)}
    if not ppo:
        methods = {m: v for m, v in methods.items() if not m.startswith("PPO")}
    if win_degenerate:
        methods["best-of-n"] = (0.5, 0.5, 0.5)  # every prompt tied: the bootstrap collapses
    rows = [{"method": m, "size": "tiny", "metric": "win_rate", "higher_is_better": True, "value": v, "ci_low": lo,
             "ci_high": hi, "n": N_PROMPTS, "baseline": "SFT@tiny", "baseline_method": "SFT"}
            for m, (v, lo, hi) in methods.items()]
    # Rows against another baseline must not be taken for win rates vs SFT.
    rows += [{**r, "value": 0.99, "ci_low": 0.98, "ci_high": 1.0, "baseline": "GPT@tiny", "baseline_method": "GPT"}
             for r in rows] + [{**r, "value": 0.3, "ci_low": 0.2, "ci_high": 0.45, "baseline": "GPT prompted@tiny",
                                "baseline_method": "GPT prompted"} for r in rows]
    pd.DataFrame(rows).to_csv(folder / "analysis_win_rate.csv", index=False)
    _per_item_tables(folder, ["GPT", "SFT", "PPO", "PPO-ptx"] if ppo else ["GPT", "SFT"])
    gens = [{"method": "SFT", "size": "tiny", "prompt_id": f"e{i}", "prompt": f"q{i}",
             "completion": " ".join(["word"] * 10)} for i in range(N_PROMPTS)]
    if ppo:  # a collapsed policy: 18 of 20 prompts get "No", two get something else
        gens += [{"method": "PPO", "size": "tiny", "prompt_id": f"e{i}", "prompt": f"q{i}",
                  "completion": "No" if i < 18 else f"Answer number {i}"} for i in range(N_PROMPTS)]
    pd.DataFrame(gens).to_csv(folder / "analysis_generations.csv", index=False)
    preds = []
    for long_name, accuracy_prompts in (("held-out prompts / training labelers", 7), ("held-out prompts / held-out labelers", 6)):
        for mode in ("kwise", "pairwise"):
            for p in range(8):
                right = p < accuracy_prompts if mode == "kwise" else False  # pairwise: all wrong, must be ignored
                for _ in range(6):
                    preds.append({"set": long_name, "prompt_id": f"r{p}", "labeler_id": f"l{p % 3}", "mode": mode,
                                  "score_chosen": 1.0 if right else 0.0, "score_rejected": 0.0 if right else 1.0})
    pd.DataFrame(preds).to_csv(folder / "rm_predictions.csv", index=False)
    (folder / "run_record.json").write_text(json.dumps({"stages": {"reward": {"stage_seconds": 1200.0}}}))
    return folder


def test_written_findings_validate_and_hold_the_right_numbers(tmp_path):
    results = _toy_results(tmp_path / "results")
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "DONE.json").write_text(json.dumps({"seconds": 600.0}))
    (reward / "timing.json").write_text(json.dumps({"comparisons_seconds": 3.0, "features_seconds": 240.0, "bias": 0.1}))
    # The reward stage's agreement.csv comes before metrics.json's copy of it.
    pd.DataFrame({"group": ["train-train", "heldout-heldout"], "mean": [0.72, 0.75], "low": [0.7, 0.72],
                  "high": [0.74, 0.78], "n_prompts": [40, 40]}).to_csv(reward / "agreement.csv", index=False)
    path = write_findings(results, reward_dir=reward, n_resamples=500)
    assert path == results / FINDINGS_FILE
    record = json.loads(path.read_text())
    validate_findings(record)
    assert record["missing"] == [] and list(k for k in record if k in SPECS) == list(SPECS)

    ppo = record["win_rate_ppo_vs_sft"]
    assert (ppo["value"], ppo["low"], ppo["high"], ppo["n"]) == pytest.approx((12.5, 5.0, 20.0, N_PROMPTS))
    assert ppo["paper"] is None and ppo["paper_side"] == "above" and ppo["verdict"] == "disagrees"
    assert record["win_rate_ppo_ptx_vs_sft"]["verdict"] == "inconclusive"
    best = record["win_rate_best_of_n_vs_sft"]
    assert best["value"] == pytest.approx(60.0) and best["best_of"] == 16 and "verdict" not in best

    rm_train, rm_heldout = record["rm_accuracy_train"], record["rm_accuracy_heldout"]
    assert rm_train["value"] == pytest.approx(100 * 7 / 8) and rm_train["n"] == 8 and rm_train["n_pairs"] == 48
    assert rm_heldout["value"] == pytest.approx(100 * 6 / 8) and rm_heldout["paper"] == 69.6
    assert rm_train["paper"] == 72.4 and rm_train["verdict"] == verdict(rm_train["low"], rm_train["high"], 50.0, "above", n=rm_train["n"])

    distinct, top = record["ppo_distinct_fraction"], record["ppo_top_answer_fraction"]
    assert distinct["value"] == pytest.approx(100 * 3 / N_PROMPTS) and distinct["n"] == N_PROMPTS
    assert top["value"] == pytest.approx(90.0) and top["top_answer"] == "No"
    assert (top["low"], top["high"]) == pytest.approx(tuple(100 * x for x in wilson_interval(18, N_PROMPTS)))
    length = record["ppo_length_ratio"]
    assert length["value"] == pytest.approx((18 * 1 + 2 * 3) / (N_PROMPTS * 10)) and "words" in length["unit"]
    assert length["low"] < length["value"] < length["high"]
    minutes = record["reward_stage_minutes"]
    assert minutes["value"] == 10.0 and minutes["low"] is None and minutes["no_interval_reason"]  # DONE.json first
    assert minutes["parts_minutes"] == {"comparisons": 0.05, "features": 4.0}  # where the time went; bias is no time

    agreement = record["agreement_train"]
    assert (agreement["value"], agreement["n"], agreement["paper"]) == pytest.approx((72.0, 40, 72.6))
    assert agreement["verdict"] == FIXED_BY_DESIGN and "calibrated" in agreement["by_design"] and "no_effect" not in agreement
    assert record["about"]["sources"]["agreement_train"] == "reward/agreement.csv"

    # Without the reward stage, run_record.json's copy of its seconds is used.
    assert build_findings(results, n_resamples=100)["reward_stage_minutes"]["value"] == 20.0
    table = findings_table(load_findings(results))
    assert table.loc["win_rate_ppo_vs_sft", "n"] == str(N_PROMPTS) and table.loc["rm_accuracy_train", "n"] == "8"
    assert "72.4" in table.loc["rm_accuracy_train", "paper"]


def test_missing_ppo_is_listed_never_invented(tmp_path):
    results = _toy_results(tmp_path / "results", ppo=False)
    (results / "rm_predictions.csv").unlink()
    (results / "run_record.json").unlink()
    record = json.loads(write_findings(results, n_resamples=100).read_text())
    validate_findings(record)
    gone = {name for name in SPECS if "ppo" in name} | {"rm_accuracy_train", "rm_accuracy_heldout", "reward_stage_minutes"}
    assert set(record["missing"]) == gone and not gone & set(record)
    assert {"win_rate_best_of_n_vs_sft", "squad_f1_sft_minus_gpt", "toxic_rate_respectful_sft_minus_gpt"} <= set(record)
    reasons = record["about"]["missing_reasons"]
    assert "PPO" in reasons["ppo_distinct_fraction"] and "reward" in reasons["rm_accuracy_train"]
    assert "no PPO-ptx or PPO items in analysis_squad_per_item.csv" in reasons["squad_f1_ppo_ptx_minus_ppo"]


def test_paired_differences_have_n_the_papers_sign_and_every_verdict(tmp_path):
    record = build_findings(_toy_results(tmp_path / "results"), n_resamples=1000)
    validate_findings(record)
    tax = record["squad_f1_ppo_minus_gpt"]  # PPO 75 F1 points below GPT, as the paper's alignment tax (below 0)
    assert (tax["value"], tax["n"], tax["unit"], tax["n_unit"]) == (pytest.approx(-75.0), N_ITEMS, "F1 points", "questions")
    assert tax["high"] < 0 and tax["paper"] == pytest.approx(-17.8) and tax["paper_side"] == "below"
    assert tax["no_effect"] == 0.0 and tax["verdict"] == "agrees" and "paired bootstrap" in tax["interval"]
    assert (tax["value_method"], tax["value_baseline"]) == pytest.approx((25.0, 100.0))
    truthful = record["truthfulqa_true_informative_ppo_ptx_minus_gpt"]  # 75 points below GPT; the paper: above
    assert truthful["value"] == pytest.approx(-75.0) and truthful["verdict"] == "disagrees"
    same = record["squad_f1_ppo_ptx_minus_ppo"]  # identical answers: no spread, a Clopper-Pearson bound, not [0, 0]
    bound = 100 * (1 - 0.025 ** (1 / N_ITEMS))
    assert same["value"] == 0.0 and (same["low"], same["high"]) == pytest.approx((-bound, bound))
    assert same["verdict"] == "inconclusive" and "Clopper-Pearson" in same["interval"]
    toxic = record["toxic_rate_respectful_ppo_ptx_minus_gpt"]  # respectful condition only: plain rows are ignored
    assert toxic["value"] == pytest.approx(-50.0) and toxic["n_unit"] == "prompts" and toxic["verdict"] == "agrees"
    assert record["toxic_rate_respectful_ppo_minus_sft"]["verdict"] == "inconclusive"
    hallucination = record["hallucination_rate_ppo_ptx_minus_gpt"]
    assert hallucination["value"] == pytest.approx(-75.0) and hallucination["n"] == 12 and hallucination["verdict"] == "agrees"
    without_claim = record["squad_f1_sft_minus_gpt"]  # the paper gives no SFT number: no verdict, still an interval
    assert "verdict" not in without_claim and without_claim["low"] < without_claim["value"] < without_claim["high"]
    assert record["win_rate_ppo_ptx_vs_gpt"]["verdict"] == "agrees"  # 99 [98, 100] vs the paper's 85 above 50
    assert record["win_rate_ppo_ptx_vs_gpt_prompted"]["verdict"] == "disagrees"  # 30 [20, 45]: below 50
    table = findings_table(record)
    assert table.loc["squad_f1_ppo_minus_gpt", "n"] == str(N_ITEMS) and "PPO 25.0 vs GPT 100.0" in table.loc["squad_f1_ppo_minus_gpt", "note"]


def test_a_paired_difference_uses_only_the_items_both_methods_have(tmp_path):
    results = _toy_results(tmp_path / "results")
    table = pd.read_csv(results / "analysis_truthfulqa_per_item.csv")
    table.loc[(table["method"] == "PPO-ptx") & (table["id"] == "tq0"), "true_informative"] = math.nan  # an empty cell
    table[~((table["method"] == "GPT") & (table["id"] == "tq1"))].to_csv(results / "analysis_truthfulqa_per_item.csv",
                                                                        index=False)  # GPT never answered tq1
    record = build_findings(results, n_resamples=200)
    validate_findings(record)
    assert record["truthfulqa_true_informative_ppo_ptx_minus_gpt"]["n"] == N_ITEMS - 2
    assert record["truthfulqa_true_informative_ppo_minus_gpt"]["n"] == N_ITEMS - 1


def test_every_paper_claim_gets_a_verdict_or_says_it_is_fixed_by_design():
    for name, claim in paper.CLAIMS.items():
        assert name in SPECS, name
        assert (claim.no_effect is not None and claim.side in ("above", "below")) != (name in paper.BY_DESIGN), name
    assert paper.SQUAD_TAX.value == pytest.approx(51.95 - 69.75) and paper.SQUAD_RECOVERY.value == pytest.approx(17.98)


def test_a_collapsed_bootstrap_gets_a_wilson_interval_not_zero_width(tmp_path):
    record = build_findings(_toy_results(tmp_path / "results", win_degenerate=True), n_resamples=100)
    best = record["win_rate_best_of_n_vs_sft"]
    assert best["value"] == 50.0 and best["low"] < 50.0 < best["high"] and "Wilson" in best["interval"]
    validate_findings(record)


def _valid_record(tmp_path: Path) -> dict:
    return build_findings(_toy_results(tmp_path / "results"), n_resamples=200)


@pytest.mark.parametrize(("metric", "mutate", "problem"), [
    ("rm_accuracy_train", lambda e: e.pop("n"), "missing key"),
    ("rm_accuracy_train", lambda e: e.update(value=math.nan), "finite"),
    ("win_rate_ppo_vs_sft", lambda e: e.update(high=math.inf), "finite"),
    ("win_rate_ppo_vs_sft", lambda e: e.update(low=e["value"] + 1), "low <= value <= high"),
    ("ppo_distinct_fraction", lambda e: e.update(low=e["value"], high=e["value"]), "zero-width"),
    ("ppo_top_answer_fraction", lambda e: e.update(n=0), "n must be"),
    ("ppo_top_answer_fraction", lambda e: e.update(n=3.5), "n must be"),
    ("rm_accuracy_heldout", lambda e: e.update(verdict="maybe"), "verdict must be"),
    ("squad_f1_ppo_ptx_minus_ppo", lambda e: e.update(low=e["value"], high=e["value"]), "zero-width"),
    ("squad_f1_ppo_minus_gpt", lambda e: e.pop("n"), "missing key"),
    ("toxic_rate_respectful_ppo_ptx_minus_gpt", lambda e: e.update(verdict="disagrees"), "contradicts"),
    ("agreement_train", lambda e: e.pop("by_design"), "by_design"),
    ("win_rate_ppo_vs_sft", lambda e: e.update(verdict="agrees"), "contradicts"),
    ("rm_accuracy_train", lambda e: e.pop("verdict"), "no verdict"),
    ("rm_accuracy_train", lambda e: e.pop("paper_side"), "paper_side"),
    ("reward_stage_minutes", lambda e: e.pop("no_interval_reason"), "no_interval_reason"),
    ("ppo_length_ratio", lambda e: e.update(unit=""), "unit"),
    ("ppo_length_ratio", lambda e: e.update(higher_is_better="yes"), "higher_is_better"),
])
def test_validator_names_the_metric_and_the_problem(tmp_path, metric, mutate, problem):
    record = _valid_record(tmp_path)
    validate_findings(record)
    broken = copy.deepcopy(record)
    mutate(broken[metric])
    with pytest.raises(ValueError, match=problem) as err:
        validate_findings(broken)
    assert metric in str(err.value)


def test_validator_rejects_a_metric_both_reported_and_missing_and_non_objects(tmp_path):
    record = _valid_record(tmp_path)
    with pytest.raises(ValueError, match="win_rate_ppo_vs_sft"):
        validate_findings({**record, "missing": ["win_rate_ppo_vs_sft"]})
    with pytest.raises(ValueError):
        validate_findings([record])
    with pytest.raises(ValueError):
        validate_findings({"missing": "everything"})


def test_load_findings_refuses_a_broken_file(tmp_path):
    results = _toy_results(tmp_path / "results")
    path = write_findings(results, n_resamples=100)
    record = json.loads(path.read_text())
    record["rm_accuracy_train"]["low"] = record["rm_accuracy_train"]["high"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="rm_accuracy_train"):
        load_findings(results)
    assert load_findings(tmp_path / "nowhere") is None


def test_committed_tiny_results_give_a_valid_record(tmp_path):
    """The real files of results/tiny/ (as a reader of the study has them) give a valid findings.json."""
    source = REPO / "results" / "tiny"
    names = ("metrics.json", "analysis_win_rate.csv", "analysis_generations.csv", "rm_predictions.csv", "run_record.json")
    if not all((source / n).exists() for n in names):
        pytest.skip("results/tiny is not rendered in this checkout")
    for name in names:
        shutil.copy2(source / name, tmp_path / name)
    record = load_findings(write_findings(tmp_path, n_resamples=500).parent)
    assert record is not None
    for name in ("rm_accuracy_train", "rm_accuracy_heldout", "win_rate_ppo_vs_sft", "reward_stage_minutes"):
        assert name in record or name in record["missing"]
    prompts = pd.read_csv(source / "rm_predictions.csv")
    if "rm_accuracy_heldout" in record:  # n is prompts, far fewer than the pairs
        assert record["rm_accuracy_heldout"]["n"] < record["rm_accuracy_heldout"]["n_pairs"] <= len(prompts)


# --------------------------------------------------------------------------------------------
# Where it is written and shown
# --------------------------------------------------------------------------------------------


def test_export_results_writes_findings_beside_the_tables(tmp_path):
    from rlhf_lib.analysis import export_results

    toy = _toy_results(tmp_path / "toy")
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy2(toy / "metrics.json", stage / "metrics.json")
    for name in ("win_rate", "generations", "squad_per_item", "truthfulqa_per_item", "toxicity_generations",
                 "hallucination_per_item"):
        shutil.copy2(toy / f"analysis_{name}.csv", stage / f"{name}.csv")
    reward = tmp_path / "reward"
    reward.mkdir()
    shutil.copy2(toy / "rm_predictions.csv", reward / "predictions.csv")
    (reward / "DONE.json").write_text(json.dumps({"seconds": 90.0}))
    results = tmp_path / "results"
    copied = export_results(stage, results, reward_dir=reward)
    assert results / FINDINGS_FILE in copied
    record = load_findings(results)
    assert record["missing"] == [] and record["reward_stage_minutes"]["value"] == 1.5
    assert record["about"]["sources"]["rm_accuracy_train"] == "reward/predictions.csv"  # no absolute paths
    assert record["about"]["sources"]["win_rate_ppo_vs_sft"] == "analysis_win_rate.csv"
    assert results / "fig_findings.png" in copied  # its forest plot, beside it


def test_forest_plot_has_a_row_per_finding_with_an_interval(tmp_path):
    import pandas as pd

    from rlhf_lib.analysis import plot_findings

    results = _toy_results(tmp_path / "tiny")
    record = build_findings(results, n_resamples=200)
    png = plot_findings(record, tmp_path / "fig_findings.png")
    drawn = pd.read_csv(png.with_suffix(".csv"))
    with_interval = [name for name, entry in record.items()
                     if name not in ("missing", "about") and entry.get("low") is not None]
    assert png.exists() and list(drawn["metric"]) == with_interval
    assert "reward_stage_minutes" not in set(drawn["metric"])  # no interval, nothing to draw
    assert (drawn["low"] <= drawn["value"]).all() and (drawn["value"] <= drawn["high"]).all()
    papers = {name: entry.get("paper") for name, entry in record.items() if name in with_interval}
    assert {m: None if pd.isna(x) else x for m, x in zip(drawn["metric"], drawn["paper"], strict=True)} == papers
    assert plot_findings({"missing": [], "about": {}}, tmp_path / "none.png") is None


def test_rm_reliability_diagram_gives_every_bin_a_wilson_interval(tmp_path):
    import pandas as pd

    from rlhf_lib.plots import plot_rm_reliability
    from rlhf_lib.reward import calibration_table

    predictions = pd.read_csv(_toy_results(tmp_path / "tiny") / "rm_predictions.csv")
    table = calibration_table(predictions, bins=4)
    png = plot_rm_reliability(table, tmp_path / "rm_reliability.png")
    drawn = pd.read_csv(png.with_suffix(".csv"))
    assert png.exists() and len(drawn) == len(table) and drawn["n"].sum() == len(predictions)
    assert (drawn["ci_low"] <= drawn["observed"]).all() and (drawn["observed"] <= drawn["ci_high"]).all()
    assert (drawn["ci_high"] > drawn["ci_low"]).all()  # Wilson: positive width even for a bin at 0/n or n/n
    one_sided = pd.DataFrame({"predicted": [0.1, 0.9], "observed": [0.0, 1.0], "n": [5, 5]})
    drawn = pd.read_csv(plot_rm_reliability(one_sided, tmp_path / "edge.png").with_suffix(".csv"))
    assert drawn.loc[0, "ci_high"] > 0 and drawn.loc[1, "ci_low"] < 1


def test_summary_opens_with_the_findings_figure_when_it_exists(tmp_path):
    from rlhf_lib.analysis import write_findings_and_figure
    from rlhf_lib.report import write_summary

    results = _toy_results(tmp_path / "tiny")
    text = write_summary(tmp_path, ["tiny"], command="python run_all.py").read_text()
    assert "fig_findings.png" not in text  # nothing drawn yet: nothing linked
    written = write_findings_and_figure(results)
    assert [p.name for p in written] == ["findings.json", "fig_findings.png"]
    text = write_summary(tmp_path, ["tiny"], command="python run_all.py").read_text()
    assert "![tiny: findings](tiny/fig_findings.png)" in text
    assert text.index("fig_findings.png") < text.index("## The paper's findings beside ours")


def test_summary_renders_the_findings_with_n_beside_every_number(tmp_path):
    from rlhf_lib.report import write_summary

    results = _toy_results(tmp_path / "tiny")
    write_findings(results, n_resamples=200)
    text = write_summary(tmp_path, ["tiny"], command="python run_all.py").read_text()
    assert "## tiny: findings (`tiny/findings.json`)" in text
    assert "| metric | this run [95% interval] | n | unit | paper | verdict | note |" in text
    assert "best-of-16" in text and 'top answer: "No"' in text
    assert f"| win_rate_ppo_vs_sft | 12.5 [5.0, 20.0] | {N_PROMPTS} | percent |" in text and "| disagrees |" in text
    assert "| reward_stage_minutes | 20.0 | 1 | minutes |" in text
    assert "Baseline: 'GPT' is smollm2-135m-instruct, already instruction-tuned" in text  # not the paper's GPT-3
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in SPECS]
    assert len(rows) == len(SPECS) and all(line.split(" | ")[2].strip().isdigit() for line in rows)
    intervals = re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", text)
    assert intervals and all(low != high for low, high in intervals)  # no zero-width interval printed anywhere


def test_summary_takes_the_papers_rows_from_findings_with_paired_intervals(tmp_path):
    from rlhf_lib.report import finding, write_summary

    results = _toy_results(tmp_path / "tiny")
    write_findings(results, n_resamples=500)
    record = load_findings(results)
    text = write_summary(tmp_path, ["tiny"], command="python run_all.py").read_text()
    tax, same = record["squad_f1_ppo_minus_gpt"], record["squad_f1_ppo_ptx_minus_ppo"]
    assert (f"| tax: PPO minus GPT: -75.0 [{tax['low']:.1f}, {tax['high']:.1f}] F1 points (PPO 25.0 vs GPT 100.0, n={N_ITEMS}); "
            f"recovery: PPO-ptx minus PPO: 0.0 [{same['low']:.1f}, {same['high']:.1f}] F1 points (PPO-ptx 25.0 vs PPO 25.0, "
            f"n={N_ITEMS}) | tax agrees; recovery inconclusive |") in text
    assert "(PPO-ptx minus GPT, PPO-ptx 0.0 vs GPT 75.0, n=16) | disagrees |" in text  # TruthfulQA, the paper's opposite
    assert "(PPO-ptx minus GPT, PPO-ptx 0.0 vs GPT 75.0, n=12) | agrees |" in text  # hallucination, 12 prompts
    assert "99.0 [98.0, 100.0] (PPO-ptx vs GPT, n=20) | agrees |" in text
    assert "73.0 [71.0, 75.0] (n=30) | fixed by design (noise calibrated to it) |" in text
    # Without a findings record the same row comes from metrics.json (which has no methods here): n/a, not invented.
    assert finding({}, "alignment_tax").endswith("-> n/a")
    assert finding({}, "alignment_tax", record).endswith("-> tax agrees; recovery inconclusive")


def test_notebook_05_shows_the_findings_through_rlhf_lib():
    cells = json.loads((REPO / "notebooks" / "05_analysis.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert any("findings.findings_table(" in c for c in code)
    assert any("export_results(stage_dir, out, paths.stage(\"reward\")" in c for c in code)
    assert np.isfinite(Z2)


def test_run_all_writes_findings_for_an_analysed_size_only_when_analysis_is_in_the_plan(tmp_path, capsys):
    import run_all

    _toy_results(tmp_path / "out" / "micro")
    common = ["--sizes", "micro", "--output", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    run_all.write_findings_files(run_all.parse_args([*common, "--only", "sft"]), ["micro"])
    assert not (tmp_path / "out" / "micro" / FINDINGS_FILE).exists()  # analysis not in this run: nothing rewritten
    run_all.write_findings_files(run_all.parse_args(common), ["micro"])
    record = load_findings(tmp_path / "out" / "micro")
    assert record["missing"] == [] and "Findings:" in capsys.readouterr().out


def test_a_win_rate_without_prompts_is_missing_not_crashing(tmp_path):
    results = _toy_results(tmp_path / "results")
    table = pd.read_csv(results / "analysis_win_rate.csv")
    table.loc[table["method"] == "PPO-ptx", ["value", "ci_low", "ci_high", "n"]] = [math.nan, math.nan, math.nan, 0]
    table.to_csv(results / "analysis_win_rate.csv", index=False)
    record = build_findings(results, n_resamples=100)
    validate_findings(record)
    assert record["missing"] == ["win_rate_ppo_ptx_vs_sft", "win_rate_ppo_ptx_vs_gpt", "win_rate_ppo_ptx_vs_gpt_prompted"]
    assert "win_rate_ppo_vs_sft" in record


def test_paper_settings_tables_put_ours_beside_the_papers_and_catch_a_typo():
    from rlhf_lib import paper

    rows = paper.settings_beside("ppo", {"KL beta": 0.05, "minibatch": 4})
    assert rows == [("KL beta", "0.02 (fixed)", 0.05), ("minibatch", "64", 4)]
    with pytest.raises(KeyError, match="Not a paper setting of sft"):
        paper.settings_beside("sft", {"epoch": 2})
    assert all(setting.where for stage in paper.SETTINGS.values() for setting in stage.values())
