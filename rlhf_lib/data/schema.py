"""One schema for every source: `datasets.Features` for each kind of record the study uses.

Every source (BIG-bench offline, the Hub online, fixtures in tests) fills these, so later stages
never care where a row came from. `validate_rows` gives errors that name the source, file and row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from datasets import Dataset, Features, Sequence, Value

# InstructGPT's API use-case categories (Ouyang et al. 2022, Table 1), in the paper's order.
CATEGORIES = (
    "generation",
    "open_qa",
    "brainstorming",
    "chat",
    "rewrite",
    "summarization",
    "classification",
    "other",
    "closed_qa",
    "extraction",
)
# Table 1 shares, for the comparison plot (percent).
PAPER_CATEGORY_SHARE = {
    "generation": 45.6,
    "open_qa": 12.4,
    "brainstorming": 11.2,
    "chat": 8.4,
    "rewrite": 6.6,
    "summarization": 4.2,
    "classification": 3.5,
    "other": 3.5,
    "closed_qa": 2.6,
    "extraction": 1.9,
}
SPLITS = ("sft", "rm", "ppo", "eval")

# A prompt with the information the simulated labelers need to judge a completion of it.
PROMPT_FEATURES = Features(
    {
        "id": Value("string"),
        "prompt": Value("string"),  # the full user turn: instruction (+ input)
        "reference": Value("string"),  # a human-written good response ("" if none)
        "task": Value("string"),  # source task name, e.g. natural_instructions/subtask002_...
        "category": Value("string"),  # one of CATEGORIES
        "source": Value("string"),  # bigbench-1.0.0, hub:<dataset>, fixture
        "context": Value("string"),  # text the answer must be grounded in (closed-domain tasks), else ""
        "allowed_labels": Sequence(Value("string")),  # for classification: the label set, else []
        "split": Value("string"),  # one of SPLITS, or "" before splitting
    }
)

# A demonstration is a prompt whose reference is the human-written response to imitate.
DEMONSTRATION_FEATURES = PROMPT_FEATURES

# One labeler's ranking of K completions of one prompt. rank[i] is the rank of completions[i]:
# 0 is best; equal ranks are ties.
COMPARISON_FEATURES = Features(
    {
        "prompt_id": Value("string"),
        "prompt": Value("string"),
        "completions": Sequence(Value("string")),
        "completion_sources": Sequence(Value("string")),  # e.g. "base", "sft", "demonstration"
        "completion_temperatures": Sequence(Value("float32")),  # sampling temperature (-1: unknown, e.g. not sampled)
        "completion_ended": Sequence(Value("bool")),  # ended with EOS (False: cut at the token budget)
        "ranks": Sequence(Value("int32")),
        "likert": Sequence(Value("int32")),  # 1..7 per completion
        "labeler_id": Value("string"),
        "population": Value("string"),  # "train" or "heldout"
    }
)

# TruthfulQA: generated answers are judged against true/false references; MC by log-likelihood.
TRUTHFULQA_FEATURES = Features(
    {
        "id": Value("string"),
        "question": Value("string"),
        "best_answer": Value("string"),
        "correct_answers": Sequence(Value("string")),
        "incorrect_answers": Sequence(Value("string")),
        "mc_choices": Sequence(Value("string")),
        "mc_labels": Sequence(Value("int32")),  # 1 = true choice
        "source": Value("string"),
    }
)

# A human preference pair (HHH alignment, Anthropic hh-rlhf).
PREFERENCE_PAIR_FEATURES = Features(
    {
        "id": Value("string"),
        "prompt": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "subset": Value("string"),  # harmless / helpful / honest / other
        "source": Value("string"),
    }
)

# Extractive QA (SQuAD and its shifted sets) for the few-shot alignment-tax benchmark.
QA_FEATURES = Features(
    {
        "id": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": Sequence(Value("string")),
        "subset": Value("string"),
        "source": Value("string"),
    }
)

# Real prose for PPO-ptx's pretraining loss and the held-out LM loss.
PRETRAIN_FEATURES = Features({"id": Value("string"), "text": Value("string"), "source": Value("string")})

# Prompts that may elicit toxic output; `kind` says how they were built.
TOXICITY_FEATURES = Features(
    {"id": Value("string"), "prompt": Value("string"), "kind": Value("string"), "source": Value("string")}
)


class DataError(ValueError):
    """Bad input data: the message names the source, file and row, and what to do."""


def validate_rows(rows: Iterable[Mapping[str, Any]], features: Features, source: str) -> list[dict[str, Any]]:
    """Check each row has every field with the right basic type; raise DataError naming the row."""
    checked = []
    for index, row in enumerate(rows):
        missing = [key for key in features if key not in row]
        if missing:
            raise DataError(f"{source}, row {index}: missing field(s) {missing}.")
        for key, feature in features.items():
            value = row[key]
            if isinstance(feature, Sequence):
                if not isinstance(value, (list, tuple)):
                    raise DataError(f"{source}, row {index}: field '{key}' must be a list, got {type(value).__name__}.")
            elif feature.dtype == "string" and not isinstance(value, str):
                raise DataError(f"{source}, row {index}: field '{key}' must be a string, got {type(value).__name__}.")
            elif feature.dtype.startswith("int") and not isinstance(value, int):
                raise DataError(f"{source}, row {index}: field '{key}' must be an integer, got {type(value).__name__}.")
        checked.append({key: row[key] for key in features})
    return checked


def to_dataset(rows: Iterable[Mapping[str, Any]], features: Features, source: str, allow_empty: bool = False) -> Dataset:
    """A validated `datasets.Dataset`; an empty result is an error unless explicitly allowed."""
    checked = validate_rows(rows, features, source)
    if not checked and not allow_empty:
        raise DataError(f"{source}: produced no rows. Check the source files and the preset's size caps.")
    return Dataset.from_list(checked, features=features)
