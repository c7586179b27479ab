"""The prompt pool: PROMPT_PARSERS (task directory -> parser) and `load_prompt_pool`, which runs them all."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from rlhf_lib.data.bigbench.generative import (
    parse_disfl_qa,
    parse_emojis_emotion_prediction,
    parse_factuality_of_summary,
    parse_general_knowledge,
    parse_goal_step_wikihow,
    parse_intent_recognition,
    parse_irony_identification,
    parse_known_unknowns,
    parse_misconceptions,
    parse_qa_wikidata,
    parse_rephrase,
    parse_tense,
    parse_topical_chat,
)
from rlhf_lib.data.bigbench.natural_instructions import parse_natural_instructions
from rlhf_lib.data.common import ParseResult

# Task directory -> parser, for the prompt pool.
PROMPT_PARSERS: dict[str, Callable[[Path, int | None], ParseResult]] = {
    "natural_instructions": parse_natural_instructions,
    "topical_chat": parse_topical_chat,
    "rephrase": parse_rephrase,
    "tense": parse_tense,
    "goal_step_wikihow": parse_goal_step_wikihow,
    "general_knowledge": parse_general_knowledge,
    "known_unknowns": parse_known_unknowns,
    "qa_wikidata": parse_qa_wikidata,
    "misconceptions": parse_misconceptions,
    "intent_recognition": parse_intent_recognition,
    "emojis_emotion_prediction": parse_emojis_emotion_prediction,
    "irony_identification": parse_irony_identification,
    "disfl_qa": parse_disfl_qa,
    "factuality_of_summary": parse_factuality_of_summary,
}


def load_prompt_pool(root: Path, max_prompt_chars: int | None = None, tasks: Iterable[str] | None = None) -> ParseResult:
    """Every prompt task under `root` (benchmark_tasks/) parsed into PROMPT_FEATURES rows."""
    result = ParseResult()
    for task in tasks or PROMPT_PARSERS:
        result.extend(PROMPT_PARSERS[task](Path(root) / task, max_prompt_chars))
    return result
