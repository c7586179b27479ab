"""The pieces build_study_data (rlhf_lib.data.study) is made of: seeded samples, the prompt pool and its splits,
QA and pretraining text kept apart, and the two sources (BIG-bench offline, the Hub online) read into one schema."""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_lib.config import StudyConfig
from rlhf_lib.data import bigbench, hub
from rlhf_lib.data.common import ParseResult, max_chars, truncate_reference
from rlhf_lib.data.schema import (
    SPLITS,
    DataError,
)
from rlhf_lib.data.splits import check_no_leakage, dedup_key, make_splits

SQUAD_SHOTS_PER_SUBSET = 4  # few-shot example pool per SQuAD subset (the evaluation uses 0-4 shots)
MIN_PRETRAIN_CHARS = 200  # shorter paragraphs are fragments, not prose
HUB_MAX_PAIRS = 2000  # hh-rlhf has ~160k pairs; the RM-generalisation check needs a sample


def _rng(seed: int, purpose: str) -> random.Random:
    # One stream per purpose: changing one cap does not reshuffle unrelated sets.
    return random.Random(f"{seed}:{purpose}")


def _balanced_sample(rows: Sequence[dict[str, Any]], key: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Up to `n` rows drawn round-robin over the values of `rows[i][key]`, seeded."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    order = sorted(groups)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(groups[name])
    chosen: list[dict[str, Any]] = []
    while len(chosen) < n and order:
        for name in list(order):
            if len(chosen) >= n:
                break
            if groups[name]:
                chosen.append(groups[name].pop())
            else:
                order.remove(name)
    return chosen


def _prepare_pool(pool: ParseResult, total_cap: int, seed: int) -> list[dict[str, Any]]:
    """Drop exact duplicate prompts, and keep at most `total_cap` rows per task (seeded).

    No task can contribute more than every split's cap together, so the cap only saves time and
    memory; which rows survive depends on the seed.
    """
    seen: set[str] = set()
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in pool.rows:
        key = " ".join(row["prompt"].split()).lower()
        if key in seen:
            pool.skips[f"{row['task']}: duplicate prompt"] += 1
            continue
        seen.add(key)
        by_task[row["task"]].append(row)
    rng = _rng(seed, "pool")
    kept: list[dict[str, Any]] = []
    for task in sorted(by_task):
        rows = by_task[task]
        rng.shuffle(rows)
        kept.extend(rows[:total_cap])
    return kept


def _split_prompts(pool: ParseResult, cfg: StudyConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    d = cfg.data
    caps = {"sft": d.sft_prompts, "rm": d.rm_prompts, "ppo": d.ppo_prompts, "eval": d.eval_prompts}
    rows = _prepare_pool(pool, sum(caps.values()), cfg.seed)
    if not rows:
        raise DataError("prompts: the source produced no prompts within max_prompt_tokens; raise the cap or check the source.")
    result = make_splits(rows, caps, prefix_chars=d.near_duplicate_prefix_chars, seed=cfg.seed)
    for name, chosen in result.splits.items():
        if not chosen:
            raise DataError(f"prompts: split '{name}' is empty (pool of {len(rows)} prompts). Check the source and caps.")
    check_no_leakage(result.splits, d.near_duplicate_prefix_chars)
    short = {k: v for k, v in result.shortfall.items() if v > 0}
    if short:
        warnings.warn(f"prompts: splits fell short of their caps by {short} (pool of {len(rows)} prompts).", stacklevel=3)
    out = []
    for name in SPLITS:
        for row in result.splits.get(name, []):
            out.append({**row, "reference": truncate_reference(row["reference"], d.max_response_tokens)})
    return out, result.shortfall


def _qa_and_pretrain(
    qa_rows: list[dict[str, Any]], paragraphs: list[dict[str, Any]], prompts: list[dict[str, Any]], cfg: StudyConfig
) -> dict[str, list[dict[str, Any]]]:
    """SQuAD questions, few-shot pool and pretraining paragraphs, all from different paragraphs."""
    d = cfg.data
    width = d.near_duplicate_prefix_chars
    blocked = {dedup_key(row["context"], width) for row in prompts if row["context"]}
    usable = [q for q in qa_rows if q["answers"] and dedup_key(q["context"], width) not in blocked]
    fits = [q for q in usable if len(q["context"]) + len(q["question"]) <= max_chars(d.max_prompt_tokens)]
    squad = _balanced_sample(fits, "subset", d.squad_questions, _rng(cfg.seed, "squad"))
    blocked |= {dedup_key(q["context"], width) for q in squad}
    short = [q for q in fits if dedup_key(q["context"], width) not in blocked and len(q["context"]) <= max_chars(d.max_prompt_tokens) // 2]
    shots: list[dict[str, Any]] = []
    rng = _rng(cfg.seed, "squad_shots")
    for subset in sorted({q["subset"] for q in squad}):
        pool = [q for q in short if q["subset"] == subset]
        shots.extend(rng.sample(pool, min(SQUAD_SHOTS_PER_SUBSET, len(pool))))
    blocked |= {dedup_key(q["context"], width) for q in shots}
    longest = max_chars(d.max_prompt_tokens + d.max_response_tokens)
    candidates, seen = [], set()
    for paragraph in paragraphs:
        key = dedup_key(paragraph["text"], width)
        if key in blocked or key in seen or not MIN_PRETRAIN_CHARS <= len(paragraph["text"]) <= longest:
            continue
        seen.add(key)
        candidates.append({**paragraph, "subset": paragraph["id"].split("/")[1] if "/" in paragraph["id"] else ""})
    n_heldout = max(8, d.pretrain_docs // 8)
    picked = _balanced_sample(candidates, "subset", d.pretrain_docs + n_heldout, _rng(cfg.seed, "pretrain"))
    strip = [{k: v for k, v in p.items() if k != "subset"} for p in picked]
    return {"squad": squad, "squad_shots": shots, "pretrain": strip[n_heldout:], "pretrain_heldout": strip[:n_heldout]}


def _sample_in_order(rows: list[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """A seeded sample of `n` rows, kept in source order (readable ids)."""
    keep = sorted(rng.sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


def _bigbench_sources(cfg: StudyConfig, root: Path | None) -> dict[str, Any]:
    root = Path(root) if root else bigbench.ensure_bigbench_tasks()
    pool = bigbench.load_prompt_pool(root, max_chars(cfg.data.max_prompt_tokens))
    qa_rows, paragraphs = bigbench.parse_squad_shifts(root / "squad_shifts")
    toxicity = bigbench.parse_toxicity_prompts(root)
    pool.skips.update(toxicity.skips)
    return {
        "pool": pool,
        "truthfulqa": bigbench.parse_truthful_qa(root / "truthful_qa"),
        "pairs": bigbench.parse_hhh_alignment(root / "hhh_alignment"),
        "qa": qa_rows,
        "paragraphs": paragraphs,
        "toxicity": toxicity.rows,
        "provenance": _bigbench_provenance(root),
    }


def _bigbench_provenance(root: Path) -> dict[str, Any]:
    """What the sets were read from: the checksummed sdist, or a checkout with each task's content hash."""
    if os.environ.get(bigbench.TASKS_DIR_ENV) and Path(root) == bigbench.checkout_tasks_dir(os.environ[bigbench.TASKS_DIR_ENV]):
        return {"checkout": str(root), "tasks_sha256": bigbench.task_digests(Path(root), bigbench.TASKS)}
    return {"sdist": bigbench.SDIST_NAME, "sha256": bigbench.SDIST_SHA256, "tasks": list(bigbench.TASKS)}


def _hub_sources(cfg: StudyConfig, data_files: Mapping[str, Any] | None) -> dict[str, Any]:
    files = dict(data_files or {})
    unknown = set(files) - {"dolly", "hh_rlhf", "truthful_qa", "real_toxicity_prompts", "squad_v2"}
    if unknown:
        raise DataError(f"hub: unknown data_files keys {sorted(unknown)}.")
    limit = max_chars(cfg.data.max_prompt_tokens)
    dolly = hub.load_dolly(files.get("dolly"))
    pool = ParseResult(skips=dolly.skips)
    for row in dolly.rows:
        if len(row["prompt"]) > limit:
            pool.skips[f"{row['task']}: prompt over max_prompt_tokens"] += 1
        else:
            pool.rows.append(row)
    pairs = hub.load_hh_rlhf(files.get("hh_rlhf"))
    truthful = hub.load_truthful_qa(files.get("truthful_qa"))
    toxicity = hub.load_real_toxicity_prompts(files.get("real_toxicity_prompts"))
    squad = hub.load_squad_v2(files.get("squad_v2"))
    for part in (pairs, truthful, toxicity, squad):
        pool.skips.update(part.skips)
    paragraphs, seen = [], set()
    for row in squad.rows:
        if row["context"] not in seen:
            seen.add(row["context"])
            paragraphs.append({"id": f"squad_v2/paragraph/{len(paragraphs)}", "text": row["context"], "source": row["source"]})
    return {
        "pool": pool,
        "truthfulqa": truthful.rows,
        "pairs": _sample_in_order(pairs.rows, HUB_MAX_PAIRS, _rng(cfg.seed, "pairs")),
        "qa": squad.rows,
        "paragraphs": paragraphs,
        "toxicity": toxicity.rows,
        "provenance": {"hub": [hub.DOLLY, hub.HH_RLHF, hub.TRUTHFUL_QA, hub.REAL_TOXICITY_PROMPTS, hub.SQUAD_V2]},
    }


