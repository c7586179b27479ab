"""The widened generative mix: one parser per BIG-bench task format (chat, rewrite, brainstorming,
open and closed QA, classification from multiple choice, summarization), each into prompt rows.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from rlhf_lib.data.bigbench.fetch import SOURCE
from rlhf_lib.data.bigbench.taskfile import _best_choice, _Collector, _scores, _targets, read_task_json
from rlhf_lib.data.common import ParseResult, strip_quotes
from rlhf_lib.data.schema import DataError

_TOPICAL_TURN = re.compile(r'agent_([AB]):\s*"(.*?)"(?=\s*agent_[AB]:|\s*$)', re.S)
TOPICAL_CHAT_TURN_INDEX = 3  # one example per conversation: the 4th response (3-4 turns of history)


def parse_topical_chat(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Chat: a dialogue history and the next human-written turn, one example per conversation.

    Each conversation appears ~20 times with a growing history; taking one example per conversation
    keeps near-identical histories out of different splits and spreads the pool over topics.
    """
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector("topical_chat", max_prompt_chars)
    conversations: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(data["examples"]):
        conversations[str(example.get("comment", index))].append(index)
    for indices in conversations.values():
        index = indices[min(TOPICAL_CHAT_TURN_INDEX, len(indices) - 1)]
        example = data["examples"][index]
        ts = _targets(example, path, index)
        turns = _TOPICAL_TURN.findall(example["input"])
        if not turns or not ts:
            collect.skip("unparsed dialogue" if not turns else "empty target")
            continue
        dialogue = "\n".join(f"{speaker}: {text.strip()}" for speaker, text in turns)
        nxt = "B" if turns[-1][0] == "A" else "A"
        prompt = f"{dialogue}\n\nWrite {nxt}'s next reply in this conversation."
        collect.add(index, prompt, strip_quotes(ts[0]), "chat")
    return collect.result


def parse_rephrase(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Rewrite: rephrase a sentence so that it contains a given keyword."""
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector("rephrase", max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        ts = _targets(example, path, index)
        sentence, sep, keyword = example["input"].partition("Keyword:")
        if not sep or not ts:
            collect.skip("no keyword" if not sep else "empty target")
            continue
        prompt = (
            f"Sentence: {sentence.strip()}\nKeyword: {keyword.strip()}\n\n"
            "Rephrase the sentence so that it keeps its meaning but contains the keyword."
        )
        collect.add(index, prompt, ts[0], "rewrite")
    return collect.result


_TENSE = re.compile(r"^(?P<sentence>.*?)\s*(?:Change tense to (?P<tense>[A-Z ]+))?:\s*$", re.S)


def parse_tense(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Rewrite: put a sentence into another tense (the tense is in the input or the row's task_prefix)."""
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector("tense", max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        ts = _targets(example, path, index)
        match = _TENSE.match(example["input"].strip())
        tense = (match.group("tense") if match else None) or example.get("task_prefix")
        if not match or not isinstance(tense, str) or not tense.strip() or not ts:
            collect.skip("unexpected template" if ts else "empty target")
            continue
        prompt = f"{match.group('sentence').strip()}\n\nChange the tense of this sentence to {tense.strip().lower()}."
        collect.add(index, prompt, ts[0], "rewrite")
    return collect.result


_WIKIHOW_STEP = re.compile(r"The most reasonable step of '(?P<goal>.+)' is", re.S)


def parse_goal_step_wikihow(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Brainstorming: suggest a step towards a wikiHow goal (step_inference; the human-written step is the reference).

    The multiple-choice distractors are dropped: the prompt asks for a step, open-ended.
    """
    path = Path(task_dir) / "step_inference" / "task.json"
    data = read_task_json(path)
    collect = _Collector("goal_step_wikihow/step_inference", max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        best = _best_choice(_scores(example, path, index))
        match = _WIKIHOW_STEP.search(example["input"])
        if not match or best is None:
            collect.skip("unexpected template" if best else "no single correct choice")
            continue
        prompt = f"Goal: {match.group('goal').strip()}\n\nSuggest one reasonable step towards this goal."
        collect.add(index, prompt, best, "brainstorming")
    return collect.result


def _parse_mc_as_open_qa(task: str, task_dir: Path, max_prompt_chars: int | None) -> ParseResult:
    """Open QA from a multiple-choice task: the question alone; the correct choice is the reference."""
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector(task, max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        best = _best_choice(_scores(example, path, index))
        if best is None:
            collect.skip("no single correct choice")
            continue
        collect.add(index, example["input"], best, "open_qa")
    return collect.result


def parse_general_knowledge(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    return _parse_mc_as_open_qa("general_knowledge", task_dir, max_prompt_chars)


def parse_known_unknowns(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Open QA where about half the answers are 'Unknown': rewards admitting ignorance."""
    return _parse_mc_as_open_qa("known_unknowns", task_dir, max_prompt_chars)


def parse_qa_wikidata(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Open QA: complete a sentence built from a Wikidata fact ("The language of X is" -> "English")."""
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector("qa_wikidata", max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        ts = _targets(example, path, index)
        if not ts:
            collect.skip("empty target")
            continue
        prompt = f"{example['input'].strip()} ...\n\nComplete this sentence with a short answer."
        collect.add(index, prompt, ts[0], "open_qa")
    return collect.result


def _parse_mc_as_classification(
    task: str, task_dir: Path, max_prompt_chars: int | None, render: Callable[[str, list[str]], str]
) -> ParseResult:
    """Classification from a multiple-choice task: the choices are the allowed labels."""
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector(task, max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        scores = _scores(example, path, index)
        best = _best_choice(scores)
        if best is None:
            collect.skip("no single correct choice")
            continue
        labels = list(scores)
        collect.add(index, render(example["input"].strip(), labels), best, "classification", labels=labels)
    return collect.result


def parse_misconceptions(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    def render(text: str, labels: list[str]) -> str:
        return f"Statement: {text}\n\nIs this statement true or false? Answer T for true or F for false."

    return _parse_mc_as_classification("misconceptions", task_dir, max_prompt_chars, render)


def parse_intent_recognition(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    def render(text: str, labels: list[str]) -> str:
        return f"{text}\n\nPredict the intent of the utterance. Choose one of: {', '.join(labels)}."

    return _parse_mc_as_classification("intent_recognition", task_dir, max_prompt_chars, render)


def parse_emojis_emotion_prediction(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Emotion of an emoji; the crowd's soft scores are reduced to their single top emotion (ties skipped)."""

    def render(text: str, labels: list[str]) -> str:
        return f"Emoji: {text}\n\nWhich emotion does this emoji most closely express? Choose one of: {', '.join(labels)}."

    return _parse_mc_as_classification("emojis_emotion_prediction", task_dir, max_prompt_chars, render)


def parse_irony_identification(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    def render(text: str, labels: list[str]) -> str:
        return f"Sentence: {text}\n\nIs this sentence ironic? Answer 'ironic' or 'not ironic'."

    return _parse_mc_as_classification("irony_identification", task_dir, max_prompt_chars, render)


def parse_disfl_qa(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Closed QA: a disfluent spoken-style question about a Wikipedia passage; answer is a span."""
    path = Path(task_dir) / "task.json"
    data = read_task_json(path)
    collect = _Collector("disfl_qa", max_prompt_chars)
    for index, example in enumerate(data["examples"]):
        ts = _targets(example, path, index)
        question, sep, passage = example["input"].partition("\ncontext:")
        if not sep or not ts:
            collect.skip("no context" if not sep else "empty target")
            continue
        passage = passage.strip()
        prompt = f"Context: {passage}\nQuestion: {question.strip()}\n\nAnswer the question with a short span from the context."
        collect.add(index, prompt, ts[0], "closed_qa", context=passage)
    return collect.result


def parse_factuality_of_summary(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Summarization: XSum articles with their human-written one-sentence summary (`true_cnd`).

    The file is JSON lines after two canary comment lines; the model-written candidate summaries are
    ignored. (CNN/DM in the same task is left out: its articles, median 3,100 characters, exceed
    every preset's prompt cap.)
    """
    path = Path(task_dir) / "xsum.json"
    collect = _Collector("factuality_of_summary/xsum", max_prompt_chars)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError(f"{SOURCE}: {path} is missing.") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{SOURCE}: {path}, line {number}: not valid JSON ({err}).") from err
        if not isinstance(record.get("source"), str) or not isinstance(record.get("true_cnd"), str):
            raise DataError(f"{SOURCE}: {path}, line {number}: missing string field 'source' or 'true_cnd'.")
        article = record["source"].strip()
        prompt = f"Article: {article}\n\nSummarize the article in one sentence."
        collect.add(number, prompt, record["true_cnd"], "summarization", context=article)
    return collect.result
