"""A labeling run: labelers rank and Likert-rate each prompt's K completions (`label_comparisons`).

The result is rows of COMPARISON_FEATURES, one per (prompt, labeler). With an output path, each ranking is
appended to a JSONL file as soon as it is made, and a rerun resumes from that file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from rlhf_lib.data.schema import COMPARISON_FEATURES, to_dataset
from rlhf_lib.labelers.calibration import _check_inputs
from rlhf_lib.labelers.criteria import _get, score_completions
from rlhf_lib.labelers.population import Labeler
from rlhf_lib.labelers.ranking import _stable_int, competition_ranks, likert_from_utility


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (killed mid-write) is dropped from the file."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    good_bytes = 0
    with path.open("rb") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            if line.strip():
                rows.append(json.loads(line))
        except ValueError as err:
            if number == len(lines):
                with path.open("r+b") as handle:
                    handle.truncate(good_bytes)
                break
            raise ValueError(f"{path}, line {number}: not valid JSON ({err}); delete the file to relabel.") from err
        good_bytes += len(line)
    return rows


def label_comparisons(
    prompt_rows: Sequence[Mapping[str, Any]],
    completions_per_prompt: Sequence[Sequence[str]],
    sources_per_prompt: Sequence[Sequence[str]],
    population: Sequence[Labeler],
    seed: int = 0,
    out_path: str | os.PathLike[str] | None = None,
    *,
    labelers_per_prompt: int = 1,
    temperatures_per_prompt: Sequence[Sequence[float]] | None = None,
    ended_per_prompt: Sequence[Sequence[bool]] | None = None,
    progress: bool = True,
) -> Dataset:
    """Labelers rank and Likert-rate each prompt's K completions; rows of COMPARISON_FEATURES.

    Each prompt is ranked by `labelers_per_prompt` distinct labelers (the paper: one), assigned
    round-robin over a seeded order of the population, so each does an equal share; one row per
    (prompt, labeler). Each ranking's noise comes from (seed, prompt id, labeler id), so the result
    does not depend on which prompts were labeled in an earlier, interrupted run. With `out_path`,
    each row is appended to that JSONL file as soon as it is labeled, and rankings already in the
    file are skipped on a rerun (resume). Likert scores use the same noisy utilities as the ranking,
    so a better-ranked completion never gets a lower Likert score from the same labeler.
    `temperatures_per_prompt` and `ended_per_prompt` are carried into the rows (defaults: -1 = unknown, True).
    """
    from tqdm.auto import tqdm

    _check_inputs(prompt_rows, completions_per_prompt)
    if len(sources_per_prompt) != len(prompt_rows):
        raise ValueError(f"{len(prompt_rows)} prompt rows but {len(sources_per_prompt)} source lists.")
    if not population:
        raise ValueError("label_comparisons needs at least one labeler.")
    if not 1 <= labelers_per_prompt <= len(population):
        raise ValueError(f"labelers_per_prompt must be in [1, {len(population)}] (the population), got {labelers_per_prompt}.")
    for name, extra in (("temperatures_per_prompt", temperatures_per_prompt), ("ended_per_prompt", ended_per_prompt)):
        if extra is not None and [len(x) for x in extra] != [len(c) for c in completions_per_prompt]:
            raise ValueError(f"{name} must give one value per completion of every prompt.")
    ids = [str(_get(row, "id", "")) for row in prompt_rows]
    if len(set(ids)) != len(ids) or "" in ids:
        raise ValueError("Every prompt row needs a unique, non-empty 'id' (resuming is keyed by it).")

    path = Path(out_path) if out_path is not None else None
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = {(row["prompt_id"], row["labeler_id"]): row for row in _read_jsonl(path)}
    order = np.random.default_rng([seed, 11]).permutation(len(population))
    handle = path.open("a", encoding="utf-8") if path is not None else None
    results: list[dict[str, Any]] = []
    try:
        bar = tqdm(total=len(prompt_rows) * labelers_per_prompt, desc="labeling", disable=not progress)
        for index, (row, completions, sources) in enumerate(
            zip(prompt_rows, completions_per_prompt, sources_per_prompt, strict=True)
        ):
            prompt_id = ids[index]
            if len(sources) != len(completions):
                raise ValueError(f"Prompt {prompt_id!r}: {len(completions)} completions but {len(sources)} sources.")
            temperatures = list(temperatures_per_prompt[index]) if temperatures_per_prompt else [-1.0] * len(completions)
            ended = list(ended_per_prompt[index]) if ended_per_prompt else [True] * len(completions)
            scores = None
            for slot in range(labelers_per_prompt):
                # Consecutive positions of the shuffled order: distinct labelers for one prompt.
                labeler = population[order[(index * labelers_per_prompt + slot) % len(population)]]
                if (prompt_id, labeler.id) in done:
                    previous = done[(prompt_id, labeler.id)]
                    if list(previous["completions"]) != list(completions):
                        raise ValueError(
                            f"{path} already holds different completions for prompt {prompt_id!r}; "
                            "it belongs to another run: delete it or choose another out_path."
                        )
                    results.append(previous)
                    bar.update(1)
                    continue
                scores = scores if scores is not None else score_completions(row, completions)
                rng = np.random.default_rng([seed, _stable_int(prompt_id), _stable_int(labeler.id)])
                noisy = labeler.noisy_utilities(row, completions, rng, scores=scores)
                result = {
                    "prompt_id": prompt_id,
                    "prompt": str(_get(row, "prompt", "")),
                    "completions": list(completions),
                    "completion_sources": list(sources),
                    "completion_temperatures": [float(t) for t in temperatures],
                    "completion_ended": [bool(e) for e in ended],
                    "ranks": competition_ranks(noisy),
                    "likert": [likert_from_utility(float(u)) for u in noisy],
                    "labeler_id": labeler.id,
                    "population": labeler.population,
                }
                if handle is not None:
                    handle.write(json.dumps(result, ensure_ascii=False) + "\n")
                    handle.flush()  # a killed run loses at most the ranking being written
                results.append(result)
                bar.update(1)
        bar.close()
    finally:
        if handle is not None:
            handle.close()
    return to_dataset(results, COMPARISON_FEATURES, source=str(path or "label_comparisons"), allow_empty=True)
