"""A miniature BIG-bench benchmark_tasks/ tree in the real task formats, written by tests.

Used by the parser tests, and by the micro-study tests when the real BIG-bench source cannot be had
(its PyPI sdist was delisted; see rlhf_lib/data/bigbench/).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf_lib.data import bigbench

CANARY = "fixture canary: stands where BIG-bench files carry their canary string"
WORDS = (
    "river stone garden lamp violin harbor maple cloud ticket pepper engine silver window forest candle "
    "orbit meadow copper lantern puzzle marble falcon canyon velvet signal harvest compass ember glacier"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _task(examples: list[dict], **extra: object) -> dict:
    return {"canary": CANARY, "name": "fixture", "description": "fixture task", "keywords": [], **extra, "examples": examples}


def write_bigbench_tree(root: Path, n: int = 12, seed: int = 0) -> Path:
    """A miniature benchmark_tasks/ tree with every task this study parses, in BIG-bench's real formats."""
    rng = random.Random(seed)
    ni = root / "natural_instructions"
    _write_json(ni / "task.json", {"canary": CANARY, "name": "natural_instructions", "description": "61 tasks"})
    prefix = "Definition: In this task you answer questions about a passage. Things to Avoid: guessing. Prompt: "
    _write_json(
        ni / "subtask002_quoref_answer_generation" / "task.json",
        _task(
            [{"input": f"Passage: {_words(rng, 30)}. \nQuestion: Who {_words(rng, 4)}?", "target": [f"{_words(rng, 2)}."]} for _ in range(n)],
            task_prefix=prefix + "Answer the given question. Your answer must be a single span in the passage.",
        ),
    )
    _write_json(
        ni / "subtask018_mctaco_temporal_reasoning_presence" / "task.json",
        _task(
            [{"input": f"Sentence: {_words(rng, 12)}. \nQuestion: How long {_words(rng, 3)}?", "target": [rng.choice(["Yes.", "No."])]} for _ in range(n)],
            task_prefix=prefix + "Do you think the given question needs temporal understanding?",
        ),
    )
    _write_json(
        ni / "subtask059_ropes_story_generation" / "task.json",
        _task(
            [{"input": f"Background Paragraph: {_words(rng, 25)}.", "target": [f"{_words(rng, 20)}."]} for _ in range(n)],
            task_prefix=prefix + "Write a story regarding the provided background paragraph.",
        ),
    )
    _write_json(
        ni / "subtask045_miscellaneous_sentence_paraphrasing" / "task.json",
        _task(
            [{"input": f"Sentence: {_words(rng, 10)}.", "target": [f"{_words(rng, 10)}.", "x"]} for _ in range(n)],
            task_prefix=prefix + "Generate a paraphrase of the given sentence in the input.",
        ),
    )
    examples = []
    for conv in range(n):
        turns = [f'"{_words(rng, 6)}"' for _ in range(7)]
        for k in range(6):
            speakers = ["agent_A", "agent_B"] if k % 2 == 0 else ["agent_B", "agent_A"]
            history = " ".join(f"{speakers[i % 2]}: {turns[i]}" for i in range(k + 1))
            examples.append({"input": history, "target": turns[k + 1], "comment": f"t_{conv}"})
    _write_json(root / "topical_chat" / "task.json", _task(examples, example_output_prefix=" agent_B: "))
    _write_json(
        root / "rephrase" / "task.json",
        _task([{"input": f"{_words(rng, 8)}. \nKeyword: {rng.choice(WORDS)}", "target": [f"{_words(rng, 8)}."]} for _ in range(n)]),
    )
    tense_rows = [{"input": f"{_words(rng, 6)}. Change tense to SIMPLE PAST: ", "target": f"{_words(rng, 6)}."} for _ in range(n)]
    tense_rows.append({"input": "He is riding a horse.: ", "task_prefix": "FUTURE CONTINUOUS", "target": "He will be riding a horse."})
    _write_json(root / "tense" / "task.json", _task(tense_rows))
    _write_json(
        root / "goal_step_wikihow" / "step_inference" / "task.json",
        _task([{"input": f"The most reasonable step of '{_words(rng, 4)}' is ", "target_scores": {_words(rng, 3): 0, _words(rng, 4): 1}} for _ in range(n)]),
    )
    for name in ("general_knowledge", "known_unknowns"):
        _write_json(
            root / name / "task.json",
            _task([{"input": f"How many {_words(rng, 4)}?", "target_scores": {"two": 0, _words(rng, 1): 1}} for _ in range(n)]),
        )
    _write_json(
        root / "qa_wikidata" / "task.json",
        _task([{"input": f"The country of {_words(rng, 3)} is", "target": rng.choice(["France", ["Spain", "Italy"]])} for _ in range(n)]),
    )
    _write_json(
        root / "misconceptions" / "task.json",
        _task([{"input": f"{_words(rng, 8)}.", "target_scores": {"T": 1, "F": 0}} for _ in range(n)], task_prefix="Is the following statement true or false?"),
    )
    intents = ["add_to_playlist", "book_restaurant", "get_weather"]
    _write_json(
        root / "intent_recognition" / "task.json",
        _task([{"input": f"Utterance: {_words(rng, 7)}.", "target_scores": {k: int(k == intents[i % 3]) for k in intents}} for i in range(n)]),
    )
    _write_json(
        root / "emojis_emotion_prediction" / "task.json",
        _task([{"input": chr(0x1F600 + i), "target_scores": {"joy": 0.7, "anger": 0.1, "fear": 0.0}} for i in range(n)]),
    )
    _write_json(
        root / "irony_identification" / "task.json",
        _task([{"input": f"{_words(rng, 9)}.", "target_scores": {"ironic": 1, "not ironic": 0}} for _ in range(n)]),
    )
    _write_json(
        root / "disfl_qa" / "task.json",
        _task([{"input": f"What {_words(rng, 5)} no I mean {_words(rng, 2)} ?  \ncontext: {_words(rng, 40)} .", "target": _words(rng, 2)} for _ in range(n)]),
    )
    lines = ["# " + CANARY[:40], "# canary"]
    lines += [json.dumps({"source": f"{_words(rng, 60)}.", "idx": str(i), "true_cnd": f"{_words(rng, 12)}.", "list_candidates": [], "lbl": 0}) for i in range(n)]
    (root / "factuality_of_summary").mkdir(parents=True)
    (root / "factuality_of_summary" / "xsum.json").write_text("\n".join(lines) + "\n")
    # Evaluation sets.
    questions = [
        {
            "Question": f"What happens if {_words(rng, 5)}?",
            "Category": "Misconceptions",
            "True answers": ["Nothing happens.", f"{_words(rng, 4)}."],
            "False answers": [f"{_words(rng, 4)}.", "You die."],
            "Best answer": "Nothing happens.",
        }
        for _ in range(n)
    ]
    _write_json(root / "truthful_qa" / "questions.json", {"canary": CANARY, "prefix": "Q: ...", "examples": questions})
    mc = [{"input": q["Question"], "target_scores": {q["Best answer"]: 1, q["False answers"][0]: 0, q["False answers"][1]: 0}} for q in questions]
    _write_json(root / "truthful_qa" / "task_mc.json", _task(mc))
    for subset, count in zip(bigbench.HHH_SUBSETS, (3, 2, 2, 1), strict=True):
        rows = [{"input": f"{subset} request {i}: {_words(rng, 6)}", "target_scores": {f"good {i}": 1, f"bad {i}": 0}} for i in range(count)]
        rows.append(dict(rows[0]))  # HHH repeats a request with another pair of answers
        _write_json(root / "hhh_alignment" / subset / "task.json", _task(rows))
    for subset, name in bigbench.SQUAD_SUBSETS.items():
        paragraphs = []
        for p in range(15):
            context = f"{subset} {p} {_words(rng, 45)}."
            answer = context.split()[5]
            paragraphs.append({"context": context, "qas": [{"id": f"{subset}-{p}", "question": f"Which {_words(rng, 3)}?", "answers": [{"text": answer, "answer_start": 0}] * 2}]})
        _write_json(root / "squad_shifts" / name, {"canary": CANARY, "version": "1.0", "data": [{"title": subset, "paragraphs": paragraphs}]})
    (root / "muslim_violence_bias").mkdir(parents=True)
    (root / "muslim_violence_bias" / "task.py").write_text(
        "class T:\n  def __init__(self):\n    self.verbs = ['walked', 'ran']\n    self.numbers = ['Two', 'Three']\n    self.positive_adjectives = ['calm']\n"
    )
    bbq = [
        {"comment": {"question_polarity": pol, "context_condition": "ambig"}, "input": f"A {_words(rng, 8)}. Who {i}?", "target_scores": {"Unknown": 1, "A": 0}}
        for i, pol in enumerate(["neg", "nonneg", "neg", "nonneg"])
    ]
    _write_json(root / "bbq_lite_json" / "age_ambig" / "task.json", _task(bbq))
    return root
