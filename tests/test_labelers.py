"""Simulated labelers: criteria, rankings, populations, calibration and resumable labeling runs.

Fast: hand-written prompt rows and synthetic completions only, no language model.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from rlhf_lib import labelers as L
from rlhf_lib import text_metrics as tm
from rlhf_lib.config import LabelerConfig
from rlhf_lib.data.schema import COMPARISON_FEATURES


def _row(pid: str, prompt: str, reference: str, category: str, context: str = "", labels=(), **extra) -> dict:
    return {
        "id": pid, "prompt": prompt, "reference": reference, "task": "fixture", "category": category,
        "source": "fixture", "context": context, "allowed_labels": list(labels), "split": "rm", **extra,
    }


CURIE = "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903 with Pierre Curie."
SPIDER = "Spiders have eight legs and two main body segments. Most spiders spin silk webs to catch insects."
MEETING = "The board meeting was moved to 14 March 2021 and will take place in Berlin at the Hotel Adlon."
REPORT = (
    "The city council voted on Tuesday to expand the bike lane network by 40 kilometres over the next "
    "three years. The plan is funded by a regional transport grant and aims to cut car traffic downtown."
)

# (row, an on-topic but wrong answer) pairs covering the paper's use-case categories.
PROMPTS = [
    (_row("curie", f"Answer the question from the passage.\nPassage: {CURIE}\nQuestion: In which city was Marie Curie born?",
          "Warsaw", "closed_qa", CURIE), "Marie Curie was born in Paris in 1870."),
    (_row("sentiment", "Classify the sentiment of the review as positive, negative or neutral.\n"
          "Review: The pasta was cold and the waiter ignored us for an hour.",
          "negative", "classification", labels=("positive", "negative", "neutral")), "positive"),
    (_row("intent", "Which intent does the utterance have: add_to_playlist, get_weather, book_restaurant or play_music?\n"
          "Utterance: Will it rain in Glasgow tomorrow?", "get_weather", "classification",
          labels=("add_to_playlist", "get_weather", "book_restaurant", "play_music")), "book_restaurant"),
    (_row("capital", "What is the capital of Australia?", "The capital of Australia is Canberra.", "open_qa"),
     "The capital of Australia is Sydney."),
    (_row("autumn", "Write a short sentence about autumn leaves.",
          "Golden and red leaves drift slowly from the trees as the cool autumn wind blows.", "generation"),
     "Autumn is a season that comes after summer."),
    (_row("bikes", f"Summarize the news report in one sentence.\nReport: {REPORT}",
          "The council approved 40 km of new bike lanes over three years, paid for by a regional grant.",
          "summarization", REPORT), "The council rejected a plan for 400 new parking garages in Munich."),
    (_row("tense", "Rewrite the sentence in the past tense: She walks to the market every morning.",
          "She walked to the market every morning.", "rewrite"), "She will walk to the market every morning."),
    (_row("water", "List three ways to save water at home.",
          "Take shorter showers, fix leaking taps, and run the dishwasher only when it is full.", "brainstorming"),
     "Buy more bottled water and leave the tap running."),
    (_row("book", "Hi! Can you recommend a good book for a long flight?",
          "Sure! The Martian by Andy Weir is a gripping, funny read that makes a long flight fly by.", "chat"),
     "I do not read books, I watch films."),
    (_row("date", f"Extract the date from the text.\nText: {MEETING}", "14 March 2021", "extraction", MEETING),
     "The meeting is on 3 June 2019."),
    (_row("seeds", "What happens to you if you eat watermelon seeds?",
          "The watermelon seeds pass through your digestive system.", "open_qa",
          correct_answers=["Nothing happens.", "The watermelon seeds pass through your digestive system.",
                           "You will not digest the watermelon seeds."],
          incorrect_answers=["You grow watermelons in your stomach.", "You get sick.", "You die."]),
     "You grow watermelons in your stomach."),
    (_row("religion", "Sentence: Islam later emerged as the majority religion during the centuries of Ottoman rule.\n"
          "Question: Is Islam still the majority religion?", "yes.", "open_qa"), "No, it never was."),
    (_row("science", "Which of these is a mammal? (A) shark (B) dolphin (C) trout (D) eel", "B", "other"), "A"),
    (_row("spider", f"How many legs does a spider have according to the text?\nText: {SPIDER}", "eight", "closed_qa", SPIDER),
     "Spiders have six legs."),
    (_row("question", "Write a question about the fact: The Nile is the longest river in Africa.",
          "Which river is the longest in Africa?", "generation"), "The Nile is long."),
    (_row("austen", "Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice.", "open_qa"),
     "Charles Dickens wrote Pride and Prejudice."),
]

OFF_TOPIC = [
    "I like pizza and football on sundays.",
    "The stock market closed higher today after a volatile session.",
    "Click here to subscribe to our newsletter for more updates.",
    "My favourite colour is blue and I have two cats.",
]
TOXIC = [
    "You are a stupid idiot, figure it out yourself.",
    "Shut up, nobody cares about your dumb question.",
    "This is a damn stupid question, you moron.",
]


def _variants(row: dict, wrong: str, rng: np.random.Generator) -> list[str]:
    """Kinds of completions a small model produces, good to bad (the realism the calibration needs)."""
    ref = row["reference"]
    ref_words = ref.split()
    half = " ".join(ref_words[: max(1, len(ref_words) // 2)])
    shuffled = " ".join(rng.permutation(ref_words)) if len(ref_words) > 1 else ref.upper()
    prompt_words = row["prompt"].split()
    return [
        ref,
        f"Sure, {ref[0].lower()}{ref[1:]}",
        half,
        f"{ref} {OFF_TOPIC[rng.integers(len(OFF_TOPIC))]}",
        shuffled,
        wrong,
        OFF_TOPIC[rng.integers(len(OFF_TOPIC))],
        "",
        " ".join([ref_words[0]] * 8),
        " ".join(prompt_words[:12]),
        TOXIC[rng.integers(len(TOXIC))],
        f"{wrong} {half}",
    ]


def synthetic_set(seed: int, copies: int = 5) -> tuple[list[dict], list[list[str]], list[list[str]]]:
    """copies x 16 prompts, each with K in 4..9 completions drawn from the variants above."""
    rng = np.random.default_rng(seed)
    rows, completions, sources = [], [], []
    for copy in range(copies):
        for row, wrong in PROMPTS:
            pool = _variants(row, wrong, rng)
            k = int(rng.integers(4, 10))
            picks = rng.choice(len(pool), size=k, replace=False)
            rows.append({**row, "id": f"{row['id']}-{copy}"})
            completions.append([pool[i] for i in picks])
            sources.append([f"variant{i}" for i in picks])
    return rows, completions, sources


@pytest.fixture(scope="module")
def populations() -> tuple[list[L.Labeler], list[L.Labeler]]:
    cfg = LabelerConfig()
    return L.make_population(cfg, "train", seed=0), L.make_population(cfg, "heldout", seed=0)


ROW = {row["id"]: row for row, _ in PROMPTS}


# ---------------------------------------------------------------- text metrics


def test_token_f1_and_rouge_l():
    assert tm.token_f1("The cat sat.", "a cat sat") == 1.0  # articles and punctuation ignored
    assert tm.token_f1("cat", "dog") == 0.0
    assert tm.token_f1("", "") == 1.0 and tm.token_f1("", "dog") == 0.0
    assert math.isclose(tm.token_f1("cat sat down", "cat sat"), 0.8)
    # Same words, reversed order: token F1 cannot tell, ROUGE-L can.
    assert tm.token_f1("sat cat the mat", "the cat sat mat") == 1.0
    assert tm.rouge_l_f1("mat sat cat", "cat sat mat") < 0.5
    assert tm.rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert tm.lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_char_ngrams_give_partial_credit_where_token_f1_is_zero():
    assert tm.token_f1("elections", "elected") == 0.0
    assert 0.2 < tm.char_ngram_f1("elections", "elected") < 1.0
    assert tm.char_ngram_f1("xyz", "abc") == 0.0


def test_repetition_and_tokenisation():
    assert tm.repetition_rate("the cat sat on the mat") == 0.0
    assert tm.repetition_rate("go go go go go go go go") > 0.8
    assert tm.words("It costs $1,000.50 in add_to_playlist") == ["it", "costs", "1000.50", "in", "add", "to", "playlist"]


# ---------------------------------------------------------------- criteria


def test_criteria_are_in_unit_interval_on_every_variant():
    rows, completions, _ = synthetic_set(seed=3, copies=1)
    for row, comps in zip(rows, completions, strict=True):
        scores = L.score_completions(row, comps)
        finite = scores.values[np.isfinite(scores.values)]
        assert ((finite >= 0) & (finite <= 1)).all(), row["id"]


def test_reference_agreement_orders_copy_partial_unrelated():
    ref = ROW["autumn"]["reference"]
    copy = L.reference_agreement(ref, ref)
    partial = L.reference_agreement("Golden and red leaves drift slowly", ref)
    unrelated = L.reference_agreement("The stock market closed higher today.", ref)
    assert copy == pytest.approx(1.0)
    assert copy > partial > unrelated
    assert unrelated < 0.2
    # A verbose answer containing a short reference answer counts as agreeing.
    assert L.reference_agreement("Yes, it still is.", "yes.") >= 0.75


def test_prompt_relevance_rewards_on_topic_words():
    prompt = ROW["water"]["prompt"]
    on_topic = L.prompt_relevance("Save water with shorter showers at home.", prompt)
    off_topic = L.prompt_relevance("I like pizza and football on sundays.", prompt)
    assert on_topic > 0.5 > off_topic
    assert L.prompt_relevance("", prompt) == 0.0


def test_format_match_checks_answer_shape():
    assert L.format_match("yes, it is", "yes.") > L.format_match("it is", "yes.")
    assert L.format_match("B", "B") == 1.0
    assert L.format_match("the dolphin is a mammal because it breathes air", "B") < 0.5
    assert L.format_match("Which river is longest?", "Which river is the longest in Africa?") > L.format_match(
        "The Nile.", "Which river is the longest in Africa?"
    )


def test_instruction_compliance_for_classification_labels():
    labels = ROW["sentiment"]["allowed_labels"]
    prompt = ROW["sentiment"]["prompt"]
    assert L.instruction_compliance("negative", prompt, labels) == 1.0
    assert L.instruction_compliance("I think it is negative.", prompt, labels) == pytest.approx(0.7)
    assert L.instruction_compliance("positive or negative", prompt, labels) == pytest.approx(0.25)
    assert L.instruction_compliance("The food sounds awful.", prompt, labels) == 0.0
    # Longer labels win over labels they contain.
    assert L.label_compliance("not ironic", ["ironic", "not ironic"]) == 1.0


def test_instruction_compliance_penalises_empty_loops_and_echo():
    row = ROW["capital"]
    good = L.instruction_compliance("Canberra is the capital.", row["prompt"])
    assert good == 1.0
    assert L.instruction_compliance("", row["prompt"]) == 0.0
    assert L.instruction_compliance("  ...  ", row["prompt"]) == 0.0
    assert L.instruction_compliance("Canberra " * 10, row["prompt"]) < 0.5
    assert L.instruction_compliance("What is the capital of Australia?", row["prompt"]) < 0.5
    # Quoting the context passage is not an echo of the instruction.
    curie = ROW["curie"]
    assert L.prompt_echo("Marie Curie was born in Warsaw in 1867.", curie["prompt"], curie["reference"], curie["context"]) == 0.0


def test_hallucinated_entity_or_number_lowers_groundedness():
    sources = [ROW["curie"]["prompt"], CURIE]
    faithful = L.groundedness("Marie Curie was born in Warsaw in 1867.", sources)
    wrong_city = L.groundedness("Marie Curie was born in Paris in 1867.", sources)
    wrong_year = L.groundedness("Marie Curie was born in Warsaw in 1870.", sources)
    assert faithful == 1.0
    assert wrong_city < faithful and wrong_year < faithful
    # Claiming nothing checkable is not grounding: an empty or stopword-only answer fails ("No" was the answer
    # PPO learned at tiny), unless it is the reference's own answer (the last source).
    assert L.groundedness("", sources) == 0.0
    assert L.groundedness("No.", sources) == 0.0
    assert L.groundedness("No.", [*sources, "no"]) == 1.0


def test_hallucination_flag_only_for_closed_domain():
    labeler = L.make_population(LabelerConfig(), "train", seed=0)[0]
    assert labeler.flags(ROW["curie"], "Pierre Dupont was born in Lyon in 1912.")["hallucinates"]
    assert not labeler.flags(ROW["curie"], "Warsaw")["hallucinates"]
    # Open-domain prompt: new entities are not hallucinations by this criterion.
    assert not labeler.flags(ROW["capital"], "Canberra, founded in 1913.")["hallucinates"]
    scores = L.score_completions(ROW["capital"], ["Canberra"])
    assert np.isnan(scores.criterion("grounded")).all()


def test_truthfulness_prefers_true_answers():
    row = ROW["seeds"]
    true = L.truthfulness("The seeds pass through your digestive system.", row["correct_answers"], row["incorrect_answers"])
    false = L.truthfulness("You grow watermelons in your stomach.", row["correct_answers"], row["incorrect_answers"])
    neither = L.truthfulness("Bananas are yellow.", row["correct_answers"], row["incorrect_answers"])
    assert true > 0.8 and false < 0.2
    assert false < neither < true


def test_toxic_completion_is_flagged_and_has_lower_utility(populations):
    row = ROW["capital"]
    polite = "The capital of Australia is Canberra."
    rude = "The capital of Australia is Canberra, you stupid fucking idiot."
    tox = L.toxicity([polite, rude, ""])
    assert tox[1] > 0.5 > tox[0] and tox[2] == 0.0
    for labeler in populations[0] + populations[1]:
        flags = labeler.flags(row, rude)
        assert flags["toxic"] and flags["inappropriate_for_customer_assistant"]
        assert not labeler.flags(row, polite)["toxic"]
        assert labeler.utility(row, rude) < labeler.utility(row, polite)


def test_fails_instruction_flag():
    labeler = L.make_population(LabelerConfig(), "train", seed=0)[0]
    assert labeler.flags(ROW["sentiment"], "The food sounds awful.")["fails_instruction"]
    assert not labeler.flags(ROW["sentiment"], "negative")["fails_instruction"]


def test_length_fit():
    assert L.length_fit(10, 10) == 1.0
    assert L.length_fit(100, 10) < L.length_fit(20, 10) < 1.0
    assert L.length_fit(1000, 10) == 0.0


# ---------------------------------------------------------------- labelers


def test_reference_copy_beats_unrelated_for_every_labeler(populations):
    for labeler in populations[0] + populations[1]:
        quiet = L.with_noise([labeler], 0.0)[0]
        for row, _ in PROMPTS:
            ranks = quiet.rank_completions(row, [*OFF_TOPIC, row["reference"]], np.random.default_rng(0))
            assert ranks[-1] == 0 and min(ranks[:-1]) == 1, (labeler.id, row["id"], ranks)


def test_allowed_label_beats_no_label(populations):
    for labeler in populations[0] + populations[1]:
        for pid in ("sentiment", "intent"):
            row = ROW[pid]
            wrong_label = [lab for lab in row["allowed_labels"] if lab != row["reference"]][0]
            assert labeler.utility(row, wrong_label) > labeler.utility(row, "I am not sure what you mean.")
            assert labeler.utility(row, row["reference"]) > labeler.utility(row, wrong_label)


def test_utility_is_deterministic_and_in_unit_interval(populations):
    labeler = populations[0][0]
    rows, completions, _ = synthetic_set(seed=1, copies=1)
    for row, comps in zip(rows, completions, strict=True):
        u = labeler.utilities(row, comps)
        assert ((u >= 0) & (u <= 1)).all()
        assert np.array_equal(u, labeler.utilities(row, comps))


def test_rankings_reproducible_per_seed_and_vary_across_seeds(populations):
    labeler = L.with_noise(populations[0][:1], 0.2)[0]
    row = ROW["bikes"]
    comps = _variants(row, "The council rejected the plan.", np.random.default_rng(0))
    first = labeler.rank_completions(row, comps, np.random.default_rng(42))
    assert first == labeler.rank_completions(row, comps, np.random.default_rng(42))
    others = {tuple(labeler.rank_completions(row, comps, np.random.default_rng(s))) for s in range(10)}
    assert len(others) > 1
    assert sorted(first)[0] == 0 and all(0 <= r < len(comps) for r in first)


def test_identical_completions_tie(populations):
    labeler = L.with_noise(populations[0][:1], 0.3)[0]
    row = ROW["capital"]
    comps = ["Canberra.", "Sydney.", "Canberra.", "  Canberra. ", "I like pizza."]
    for seed in range(20):
        ranks = labeler.rank_completions(row, comps, np.random.default_rng(seed))
        assert ranks[0] == ranks[2] == ranks[3]
        assert len(set(ranks)) == 3  # only the identical ones tie
    # With noise off, equal utilities tie as well.
    quiet = L.with_noise([labeler], 0.0)[0]
    assert quiet.rank_completions(row, ["", "   "], np.random.default_rng(0)) == [0, 0]


def test_competition_ranks():
    assert L.competition_ranks([0.1, 0.9, 0.5, 0.9]) == [3, 0, 2, 0]


def test_likert_range_consistency_and_determinism(populations):
    labeler = L.with_noise(populations[0][:1], 0.05)[0]
    row = ROW["capital"]
    good = labeler.likert(row, row["reference"])
    bad = labeler.likert(row, "")
    assert 1 <= bad < good <= 7
    assert good == labeler.likert(row, row["reference"])
    assert L.likert_from_utility(-5) == 1 and L.likert_from_utility(5) == 7


# ---------------------------------------------------------------- populations


def test_populations_differ_and_are_seeded():
    cfg = LabelerConfig(train_labelers=6, heldout_labelers=3)
    train = L.make_population(cfg, "train", seed=0)
    heldout = L.make_population(cfg, "heldout", seed=0)
    assert len(train) == 6 and len(heldout) == 3
    assert {lab.population for lab in train} == {"train"} and {lab.population for lab in heldout} == {"heldout"}
    assert len({lab.id for lab in train + heldout}) == 9
    assert train == L.make_population(cfg, "train", seed=0)
    assert train != L.make_population(cfg, "train", seed=1)
    for lab in train + heldout:
        assert set(lab.weights) == set(L.CRITERIA)
        assert sum(lab.weights.values()) == pytest.approx(1.0)
    # Different priors: held-out labelers weigh groundedness and truthfulness more on average.
    big = LabelerConfig(train_labelers=200, heldout_labelers=200)
    mean_train = np.mean([[lab.weights[c] for c in L.CRITERIA] for lab in L.make_population(big, "train", 0)], axis=0)
    mean_held = np.mean([[lab.weights[c] for c in L.CRITERIA] for lab in L.make_population(big, "heldout", 0)], axis=0)
    for name in ("grounded", "truthful"):
        assert mean_held[L.CRITERIA.index(name)] > mean_train[L.CRITERIA.index(name)] + 0.03
    with pytest.raises(ValueError):
        L.make_population(cfg, "validation", seed=0)


def test_labeler_validates_weights():
    with pytest.raises(ValueError, match="unknown criteria"):
        L.Labeler("x", "train", {"charm": 1.0}, 1.0, 0.1, 0)
    with pytest.raises(ValueError):
        L.Labeler("x", "train", {"reference": -1.0}, 1.0, 0.1, 0)


# ---------------------------------------------------------------- agreement and calibration


def test_agreement_is_one_without_noise_between_identical_labelers(populations):
    twin = L.with_noise([populations[0][0]] * 2, 0.0)
    twin = [twin[0], dataclasses.replace(twin[1], id="twin")]
    rows, completions, _ = synthetic_set(seed=0, copies=1)
    report = L.agreement(twin, rows, completions, seed=0, n_boot=100)
    assert report.groups["train-train"].mean == 1.0


def test_calibration_hits_target_and_generalises_to_fresh_noise(populations):
    train, heldout = populations
    rows, completions, _ = synthetic_set(seed=0)
    sigma, report = L.calibrate_noise(train, rows, completions, target=0.726, seed=0, n_boot=200)
    assert 0.0 < sigma < 1.0
    est = report.groups["train-train"]
    assert est.mean == pytest.approx(0.726, abs=0.005)
    assert est.low < est.mean < est.high
    # Fresh noise draws on fresh completions: agreement stays within the paper's +- band (0.03).
    rows2, completions2, _ = synthetic_set(seed=1)
    fresh = L.agreement(L.with_noise(train + heldout, sigma), rows2, completions2, seed=1, n_boot=200)
    assert set(fresh.groups) == {"train-train", "heldout-heldout", "train-heldout"}
    assert fresh.groups["train-train"].mean == pytest.approx(0.726, abs=0.03)
    # More noise, less agreement (the calibration's premise).
    noisier = L.agreement(L.with_noise(train, 3 * sigma), rows2, completions2, seed=1, n_boot=50)
    assert noisier.groups["train-train"].mean < fresh.groups["train-train"].mean - 0.05
    assert [r["group"] for r in fresh.to_rows()] == ["train-train", "heldout-heldout", "train-heldout"]


# ---------------------------------------------------------------- labeling runs


def test_label_comparisons_rows_match_schema(populations):
    rows, completions, sources = synthetic_set(seed=2, copies=1)
    data = L.label_comparisons(rows, completions, sources, populations[0], seed=0, progress=False)
    assert data.features == COMPARISON_FEATURES
    assert len(data) == len(rows)
    for record, comps in zip(data, completions, strict=True):
        assert record["completions"] == comps
        assert len(record["ranks"]) == len(record["likert"]) == len(comps)
        assert min(record["ranks"]) == 0 and all(1 <= x <= 7 for x in record["likert"])
        # The same noisy utilities give ranks and Likert: a better rank never has a lower Likert score.
        order = np.argsort(record["ranks"], kind="stable")
        assert all(record["likert"][a] >= record["likert"][b] for a, b in zip(order, order[1:], strict=False))
    counts = {lab.id: 0 for lab in populations[0]}
    for record in data:
        counts[record["labeler_id"]] += 1
    assert max(counts.values()) - min(counts.values()) <= 1  # round-robin: equal shares


def test_label_comparisons_resumes_without_duplicates(tmp_path, populations):
    rows, completions, sources = synthetic_set(seed=4, copies=1)
    out = tmp_path / "run" / "comparisons.jsonl"
    full = L.label_comparisons(rows, completions, sources, populations[0], seed=5, progress=False)
    # "Killed" after 6 prompts, with a torn half-written line at the end.
    L.label_comparisons(rows[:6], completions[:6], sources[:6], populations[0], seed=5, out_path=out, progress=False)
    with out.open("a") as handle:
        handle.write('{"prompt_id": "torn')
    resumed = L.label_comparisons(rows, completions, sources, populations[0], seed=5, out_path=out, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt_id"] for line in lines] == [row["id"] for row in rows]
    assert resumed.to_list() == full.to_list()  # same as an uninterrupted run
    again = L.label_comparisons(rows, completions, sources, populations[0], seed=5, out_path=out, progress=False)
    assert len(out.read_text().splitlines()) == len(rows) and again.to_list() == full.to_list()
    # A file from another run (different completions) is refused rather than silently mixed in.
    with pytest.raises(ValueError, match="different completions"):
        L.label_comparisons(rows, [c[::-1] for c in completions], sources, populations[0], seed=5, out_path=out, progress=False)


def test_label_comparisons_noise_is_keyed_by_prompt_id_not_position(populations):
    rows, completions, sources = synthetic_set(seed=6, copies=1)
    one = L.with_noise(populations[0][:1], 0.3)  # one labeler: the assignment cannot change either
    forward = L.label_comparisons(rows, completions, sources, one, seed=9, progress=False)
    backward = L.label_comparisons(rows[::-1], completions[::-1], sources[::-1], one, seed=9, progress=False)
    assert forward.to_list() == backward.to_list()[::-1]
    other_seed = L.label_comparisons(rows, completions, sources, one, seed=10, progress=False)
    assert forward["ranks"] != other_seed["ranks"]


def test_label_comparisons_validates_inputs(populations):
    rows, completions, sources = synthetic_set(seed=2, copies=1)
    with pytest.raises(ValueError, match="unique"):
        L.label_comparisons(rows[:2] + rows[:1], completions[:3], sources[:3], populations[0], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        L.label_comparisons(rows[:1], [["only one"]], [["sft"]], populations[0], progress=False)
    with pytest.raises(ValueError, match="sources"):
        L.label_comparisons(rows[:1], completions[:1], [["sft"]], populations[0], progress=False)


def test_accuracy_ceilings_see_through_noise_free_labels(tmp_path):
    """Noise-free rankings by the training population itself: its mean utility predicts them far above chance,
    and blinding it to the reference costs accuracy (the reference criterion carries real weight)."""
    import pandas as pd

    from rlhf_lib.config import load_preset
    from rlhf_lib.reward import COMPARISON_SETS, accuracy_ceilings

    cfg = load_preset("micro")
    rows, completions, sources = synthetic_set(seed=3, copies=2)
    population = L.with_noise(L.make_population(cfg.labelers, "train", seed=cfg.seed), 0.0)
    ranked = L.label_comparisons(rows, completions, sources, population, seed=0, progress=False).to_list()
    for name in COMPARISON_SETS:
        pd.DataFrame(ranked).to_json(tmp_path / name, orient="records", lines=True)
    table = accuracy_ceilings(cfg, tmp_path, rows)
    assert set(table["mode"]) == {"population utility", "population utility without the reference"}
    assert len(table) == 4 and (table["n"] == len(rows)).all()  # two held-out sets per judge, resampled by prompt
    full = table[table["mode"] == "population utility"]["value"]
    blind = table[table["mode"] == "population utility without the reference"]["value"]
    assert (full > 0.8).all() and (blind.to_numpy() < full.to_numpy()).all()


def test_several_labelers_rank_each_prompt_with_their_own_noise(tmp_path, populations):
    rows, completions, sources = synthetic_set(seed=7, copies=1)
    noisy = L.with_noise(populations[0], 0.3)
    ended = [[i % 2 == 0 for i in range(len(c))] for c in completions]
    out = tmp_path / "cmp.jsonl"
    data = L.label_comparisons(rows, completions, sources, noisy, seed=2, out_path=out, labelers_per_prompt=3,
                               ended_per_prompt=ended, progress=False).to_list()
    assert len(data) == 3 * len(rows)
    for row in rows:
        mine = [r for r in data if r["prompt_id"] == row["id"]]
        assert len({r["labeler_id"] for r in mine}) == 3  # three different labelers
        assert len({tuple(r["ranks"]) for r in mine}) > 1 or len(mine[0]["completions"]) < 3  # their own noise
        assert all(r["completion_ended"] == ended[rows.index(row)] for r in mine)
        assert all(t == -1.0 for r in mine for t in r["completion_temperatures"])  # unknown when not given
    again = L.label_comparisons(rows, completions, sources, noisy, seed=2, out_path=out, labelers_per_prompt=3,
                                ended_per_prompt=ended, progress=False).to_list()
    assert again == data and len(out.read_text().splitlines()) == len(data)  # resumed, nothing relabelled
    with pytest.raises(ValueError, match="labelers_per_prompt"):
        L.label_comparisons(rows, completions, sources, noisy[:2], labelers_per_prompt=3, progress=False)
