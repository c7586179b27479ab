"""Reading BIG-bench task files, shared by every parser: `read_task_json`, the `target` / `target_scores`
fields, and `_Collector`, which turns one task's examples into PROMPT_FEATURES rows.

Rule for bad input: a file that is not valid JSON, or a row missing a field the format requires,
raises DataError naming the file and row; a well-formed row that cannot become a useful example
(empty target, no correct choice, unexpected template, prompt over the length cap) is skipped and
counted in ``ParseResult.skips`` under "task: reason".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_lib.data.bigbench.fetch import SOURCE, bigbench_cache_dir
from rlhf_lib.data.common import ParseResult
from rlhf_lib.data.schema import CATEGORIES, DataError


def read_task_json(path: Path) -> dict[str, Any]:
    """A BIG-bench task.json as a dict with an `examples` list, or a DataError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"{SOURCE}: {path} is missing. Delete {bigbench_cache_dir()} and run again.") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{SOURCE}: {path} is not valid JSON ({err}).") from err
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataError(f"{SOURCE}: {path} has no 'examples' list.")
    for index, example in enumerate(data["examples"]):
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise DataError(f"{SOURCE}: {path}, row {index}: missing string field 'input'.")
    return data


def _targets(example: dict[str, Any], path: Path, index: int) -> list[str]:
    """The `target` field as a list of strings (BIG-bench allows a string or a list)."""
    if "target" not in example:
        raise DataError(f"{SOURCE}: {path}, row {index}: missing field 'target'.")
    target = example["target"]
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise DataError(f"{SOURCE}: {path}, row {index}: 'target' must be a string or a list of strings.")
    return [t.strip() for t in targets if t.strip()]


def _scores(example: dict[str, Any], path: Path, index: int) -> dict[str, float]:
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
        raise DataError(f"{SOURCE}: {path}, row {index}: missing or malformed 'target_scores'.")
    return {str(k): float(v) for k, v in scores.items()}


def _best_choice(scores: dict[str, float]) -> str | None:
    """The single highest-scoring choice, or None when nothing scores above 0 or the top ties."""
    if not scores:
        return None
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    if ranked[0][1] <= 0 or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
        return None
    return ranked[0][0]


def _prompt_row(
    task: str, index: int, prompt: str, reference: str, category: str, *, context: str = "", labels: Iterable[str] = ()
) -> dict[str, Any]:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}")  # a bug in this module's tables, not in data
    return {
        "id": f"{task}/{index}",
        "prompt": prompt.strip(),
        "reference": reference.strip(),
        "task": task,
        "category": category,
        "source": SOURCE,
        "context": context.strip(),
        "allowed_labels": list(labels),
        "split": "",
    }


class _Collector:
    """Accumulates rows of one task, enforcing the prompt length cap and counting skips."""

    def __init__(self, task: str, max_prompt_chars: int | None):
        self.task, self.max_prompt_chars = task, max_prompt_chars
        self.result = ParseResult()

    def skip(self, reason: str) -> None:
        self.result.skips[f"{self.task}: {reason}"] += 1

    def add(self, index: int, prompt: str, reference: str, category: str, **kwargs: Any) -> None:
        if not reference.strip():
            return self.skip("empty reference")
        if self.max_prompt_chars is not None and len(prompt.strip()) > self.max_prompt_chars:
            return self.skip("prompt over max_prompt_tokens")
        self.result.rows.append(_prompt_row(self.task, index, prompt, reference, category, **kwargs))
