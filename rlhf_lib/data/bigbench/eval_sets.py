"""Evaluation sets from BIG-bench: TruthfulQA, HHH preference pairs, SQuAD / SQuADShifts QA (and their
paragraphs), and the toxicity probes (HHH harmless requests, muslim_violence_bias, bbq_lite_json).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_lib.data.bigbench.fetch import SOURCE
from rlhf_lib.data.bigbench.taskfile import _scores, read_task_json
from rlhf_lib.data.common import ParseResult
from rlhf_lib.data.schema import DataError


def parse_truthful_qa(task_dir: Path) -> list[dict[str, Any]]:
    """TRUTHFULQA_FEATURES rows: questions.json (true/false answers) joined with task_mc.json (choices)."""
    questions_path = Path(task_dir) / "questions.json"
    mc_path = Path(task_dir) / "task_mc.json"
    try:
        questions = json.loads(questions_path.read_text(encoding="utf-8"))["examples"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{SOURCE}: {questions_path}: unreadable or without 'examples' ({err}).") from err
    choices: dict[str, dict[str, float]] = {}
    for index, example in enumerate(read_task_json(mc_path)["examples"]):
        choices[example["input"].strip()] = _scores(example, mc_path, index)
    rows = []
    for index, item in enumerate(questions):
        missing = [k for k in ("Question", "Best answer", "True answers", "False answers") if k not in item]
        if missing:
            raise DataError(f"{SOURCE}: {questions_path}, row {index}: missing field(s) {missing}.")
        question = item["Question"].strip()
        if question not in choices:
            raise DataError(f"{SOURCE}: {mc_path}: no multiple-choice entry for row {index} ({question!r}).")
        mc = choices[question]
        rows.append(
            {
                "id": f"truthful_qa/{index}",
                "question": question,
                "best_answer": item["Best answer"].strip(),
                "correct_answers": [a.strip() for a in item["True answers"]],
                "incorrect_answers": [a.strip() for a in item["False answers"]],
                "mc_choices": list(mc),
                "mc_labels": [int(v > 0) for v in mc.values()],
                "source": SOURCE,
            }
        )
    return rows


HHH_SUBSETS = ("harmless", "helpful", "honest", "other")


def parse_hhh_alignment(task_dir: Path) -> list[dict[str, Any]]:
    """PREFERENCE_PAIR_FEATURES rows: each example has exactly two answers, one scored 1 (chosen)."""
    rows = []
    for subset in HHH_SUBSETS:
        path = Path(task_dir) / subset / "task.json"
        for index, example in enumerate(read_task_json(path)["examples"]):
            scores = _scores(example, path, index)
            good = [k for k, v in scores.items() if v > 0]
            bad = [k for k, v in scores.items() if v <= 0]
            if len(scores) != 2 or len(good) != 1:
                raise DataError(f"{SOURCE}: {path}, row {index}: expected one chosen and one rejected answer, got {scores}.")
            rows.append(
                {
                    "id": f"hhh_alignment/{subset}/{index}",
                    "prompt": example["input"].strip(),
                    "chosen": good[0].strip(),
                    "rejected": bad[0].strip(),
                    "subset": subset,
                    "source": SOURCE,
                }
            )
    return rows


SQUAD_SUBSETS = {  # subset -> file (SQuAD 1.1 dev, then the four SQuADShifts test sets)
    "squad_dev": "squaddev_v1.1.json",
    "new_wiki": "new_wiki_v1.0.json",
    "nyt": "nyt_v1.0.json",
    "reddit": "reddit_v1.0.json",
    "amazon_reviews": "amazon_reviews_v1.0.json",
}


def parse_squad_shifts(task_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(QA_FEATURES rows, PRETRAIN_FEATURES paragraphs). QA ids carry the paragraph id after '#'.

    The *_removed.json files list answers that the task authors removed; they are not needed.
    """
    qa_rows, paragraphs = [], []
    for subset, name in SQUAD_SUBSETS.items():
        path = Path(task_dir) / name
        try:
            articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{SOURCE}: {path}: unreadable or without 'data' ({err}).") from err
        counter = 0
        for a_index, article in enumerate(articles):
            for p_index, paragraph in enumerate(article.get("paragraphs", [])):
                where = f"{path}, article {a_index}, paragraph {p_index}"
                if not isinstance(paragraph.get("context"), str) or not isinstance(paragraph.get("qas"), list):
                    raise DataError(f"{SOURCE}: {where}: missing 'context' or 'qas'.")
                pid = f"squad_shifts/{subset}/{a_index}.{p_index}"
                context = paragraph["context"].strip()
                paragraphs.append({"id": pid, "text": context, "source": SOURCE})
                for q_index, qa in enumerate(paragraph["qas"]):
                    if not isinstance(qa.get("question"), str) or not isinstance(qa.get("answers"), list):
                        raise DataError(f"{SOURCE}: {where}, question {q_index}: missing 'question' or 'answers'.")
                    answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a.get("text", "").strip()))
                    counter += 1
                    qa_rows.append(
                        {
                            "id": f"{pid}#{qa.get('id', q_index)}",
                            "context": context,
                            "question": qa["question"].strip(),
                            "answers": answers,
                            "subset": subset,
                            "source": SOURCE,
                        }
                    )
    return qa_rows, paragraphs


def _assigned_lists(path: Path, names: Iterable[str]) -> dict[str, list[str]]:
    """String lists assigned as `self.<name> = [...]` in a task.py, read with ast (never executed)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, SyntaxError) as err:
        raise DataError(f"{SOURCE}: {path}: unreadable ({err}).") from err
    wanted, found = set(names), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and target.attr in wanted:
                try:
                    found[target.attr] = [str(v) for v in ast.literal_eval(node.value)]
                except ValueError as err:
                    raise DataError(f"{SOURCE}: {path}: 'self.{target.attr}' is not a literal list.") from err
    missing = wanted - set(found)
    if missing:
        raise DataError(f"{SOURCE}: {path}: no assignment to {sorted(missing)}.")
    return found


def parse_toxicity_prompts(root: Path) -> ParseResult:
    """TOXICITY_FEATURES rows from three BIG-bench probes; `kind` says which.

    - ``harmful_request``: every distinct user request of HHH's harmless subset (25): mostly harmful
      or sensitive requests (violence, fraud, slurs, self-harm) plus a few benign controls.
    - ``violence_continuation``: muslim_violence_bias's open continuation prompts
      "<Number> <Muslims|Christians> <verb> into a", built from the word lists in its task.py
      (the GPT-3 finding: completions about Muslims turn violent far more often; 2 x 10 x 14 = 280).
    - ``stereotype_question``: bbq_lite_json questions with an ambiguous context and a negative
      stereotype ("Who likely planted the bomb?"); the only unbiased answer is that it is unknown.
    """
    result = ParseResult()
    hhh_path = Path(root) / "hhh_alignment" / "harmless" / "task.json"
    seen: set[str] = set()
    for example in read_task_json(hhh_path)["examples"]:
        text = example["input"].strip()
        if text not in seen:
            seen.add(text)
            result.rows.append(
                {"id": f"toxicity/harmful_request/{len(seen) - 1}", "prompt": text, "kind": "harmful_request", "source": SOURCE}
            )
    words = _assigned_lists(Path(root) / "muslim_violence_bias" / "task.py", ["numbers", "verbs"])
    index = 0
    for religion in ("Muslims", "Christians"):
        for number in words["numbers"]:
            for verb in words["verbs"]:
                result.rows.append(
                    {
                        "id": f"toxicity/violence_continuation/{religion.lower()}/{index}",
                        "prompt": f"{number} {religion} {verb} into a",
                        "kind": "violence_continuation",
                        "source": SOURCE,
                    }
                )
                index += 1
    bbq_root = Path(root) / "bbq_lite_json"
    for subdir in sorted(p for p in bbq_root.glob("*_ambig") if p.is_dir()):
        path = subdir / "task.json"
        for row, example in enumerate(read_task_json(path)["examples"]):
            comment = example.get("comment")
            if not isinstance(comment, dict):
                raise DataError(f"{SOURCE}: {path}, row {row}: missing 'comment' metadata.")
            if comment.get("question_polarity") != "neg":
                result.skips[f"bbq_lite_json/{subdir.name}: non-negative question"] += 1
                continue
            result.rows.append(
                {
                    "id": f"toxicity/stereotype_question/{subdir.name}/{row}",
                    "prompt": example["input"].strip(),
                    "kind": "stereotype_question",
                    "source": SOURCE,
                }
            )
    return result

