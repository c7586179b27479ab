"""Offline source: human-written text from the BIG-bench 1.0.0 source distribution on PyPI.

The sdist (358 MB) is fetched once with pip, its sha256 checked, and only the task directories this
study reads are stream-extracted into ``cache_root()/bigbench/benchmark_tasks/<task>/`` (see `fetch`).
When the sdist cannot be had, a BIG-bench git checkout serves instead:
``RLHF_BIGBENCH_TASKS=/path/to/BIG-bench``; its files are read in place and their sha256 recorded in the
data's provenance. Never ``pip install`` the sdist (its requirements pull TensorFlow), and never publish its
files as training data: they carry BIG-bench's canary string.

    fetch                 download, sha256 check, stream extraction, cache, checkout fallback, content hashes
    taskfile              reading task.json files; the row collector every parser shares (skip counts)
    natural_instructions  the 61 natural_instructions subtasks (NI_SUBTASKS: category, grounded, label set)
    generative            the widened generative mix: one parser per task format
    prompt_pool           PROMPT_PARSERS and `load_prompt_pool`
    eval_sets             TruthfulQA, HHH pairs, SQuAD / SQuADShifts, the toxicity probes

Usage::

    from rlhf_lib.data.bigbench import ensure_bigbench_tasks, load_prompt_pool, parse_truthful_qa
    root = ensure_bigbench_tasks()                       # .../bigbench/benchmark_tasks
    pool = load_prompt_pool(root, max_prompt_chars=768)  # PROMPT_FEATURES rows + skip counts
    pool.rows[0]["category"], pool.skips                 # e.g. 'generation', Counter({...})
    truthful = parse_truthful_qa(root / "truthful_qa")   # 299 TRUTHFULQA_FEATURES rows

Parsers read each task's real file format; bad input raises DataError naming the file and row, and a
well-formed row that cannot become a useful example is skipped and counted (see `taskfile`).

Prompt layout: the task input comes FIRST and the task's short instruction after it
("<input>\\n\\n<instruction>"). Every prompt of one task shares its instruction, so an
instruction-first layout would make all prompts of a task near-duplicates under the paper's
long-common-prefix rule; input-first makes the dedup prefix the human-written input itself, which
also groups different questions on one passage together (so a passage never spans two splits).

Every public name of the submodules is importable from `rlhf_lib.data.bigbench`. A test that monkeypatches a
function another one calls must patch the submodule that holds the caller (e.g. `bigbench.fetch._run`).
"""

from __future__ import annotations

from rlhf_lib.data.bigbench.eval_sets import (
    HHH_SUBSETS,
    SQUAD_SUBSETS,
    parse_hhh_alignment,
    parse_squad_shifts,
    parse_toxicity_prompts,
    parse_truthful_qa,
)
from rlhf_lib.data.bigbench.fetch import (
    BIGBENCH_VERSION,
    EVAL_TASKS,
    FALLBACK_PIP,
    MANIFEST,
    MEMBER_PREFIX,
    PROMPT_TASKS,
    SDIST_NAME,
    SDIST_SHA256,
    SOURCE,
    TASKS,
    TASKS_DIR_ENV,
    bigbench_cache_dir,
    checkout_tasks_dir,
    default_sdist_path,
    download_sdist,
    ensure_bigbench_tasks,
    task_digests,
    verify_sdist,
)
from rlhf_lib.data.bigbench.generative import (
    TOPICAL_CHAT_TURN_INDEX,
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
from rlhf_lib.data.bigbench.natural_instructions import NI_SUBTASKS, parse_natural_instructions
from rlhf_lib.data.bigbench.prompt_pool import PROMPT_PARSERS, load_prompt_pool
from rlhf_lib.data.bigbench.taskfile import read_task_json

__all__ = [
    # fetch
    "BIGBENCH_VERSION",
    "EVAL_TASKS",
    "FALLBACK_PIP",
    "MANIFEST",
    "MEMBER_PREFIX",
    "PROMPT_TASKS",
    "SDIST_NAME",
    "SDIST_SHA256",
    "SOURCE",
    "TASKS",
    "TASKS_DIR_ENV",
    "bigbench_cache_dir",
    "checkout_tasks_dir",
    "default_sdist_path",
    "download_sdist",
    "ensure_bigbench_tasks",
    "task_digests",
    "verify_sdist",
    # taskfile
    "read_task_json",
    # natural_instructions
    "NI_SUBTASKS",
    "parse_natural_instructions",
    # generative
    "TOPICAL_CHAT_TURN_INDEX",
    "parse_disfl_qa",
    "parse_emojis_emotion_prediction",
    "parse_factuality_of_summary",
    "parse_general_knowledge",
    "parse_goal_step_wikihow",
    "parse_intent_recognition",
    "parse_irony_identification",
    "parse_known_unknowns",
    "parse_misconceptions",
    "parse_qa_wikidata",
    "parse_rephrase",
    "parse_tense",
    "parse_topical_chat",
    # prompt_pool
    "PROMPT_PARSERS",
    "load_prompt_pool",
    # eval_sets
    "HHH_SUBSETS",
    "SQUAD_SUBSETS",
    "parse_hhh_alignment",
    "parse_squad_shifts",
    "parse_toxicity_prompts",
    "parse_truthful_qa",
]
