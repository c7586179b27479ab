"""Online source: Hugging Face Hub datasets filling the same schema as the offline BIG-bench source.

Each adapter calls `datasets.load_dataset` and maps the dataset's own columns onto one schema
(rlhf_lib.data.schema). Pass `data_files` (local files in the dataset's real column format:
.jsonl/.json[.gz], .parquet or .csv) to read those instead of the Hub; that is how the tests run
offline. Without `data_files` and without network (or a filled Hugging Face cache) an adapter fails
in about a second with a DataError saying what to do; nothing is ever faked.

    from rlhf_lib.data.hub import load_dolly, load_hh_rlhf
    demos = load_dolly()                                    # databricks/databricks-dolly-15k, online
    pairs = load_hh_rlhf(data_files=["harmless-base/train.jsonl.gz"])   # local files, offline
    pairs.rows[0]["subset"], pairs.skips                    # 'harmless', Counter()
    dataset = demos.dataset(PROMPT_FEATURES, "hub:dolly")    # a validated datasets.Dataset

Every adapter returns a ParseResult: rows already in the schema, plus skip counts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_lib.data.common import ParseResult
from rlhf_lib.data.schema import DataError

DOLLY = "databricks/databricks-dolly-15k"
HH_RLHF = "Anthropic/hh-rlhf"
TRUTHFUL_QA = "truthfulqa/truthful_qa"
REAL_TOXICITY_PROMPTS = "allenai/real-toxicity-prompts"
SQUAD_V2 = "rajpurkar/squad_v2"

DataFiles = str | Path | Sequence[str | Path]

# Dolly's categories -> InstructGPT's use cases (Dolly's own category names follow the paper's).
DOLLY_CATEGORIES = {
    "creative_writing": "generation",
    "open_qa": "open_qa",
    "general_qa": "open_qa",
    "brainstorming": "brainstorming",
    "classification": "classification",
    "closed_qa": "closed_qa",
    "information_extraction": "extraction",
    "summarization": "summarization",
}
# Dolly categories whose answer must come from the given context (closed-domain).
_GROUNDED = {"closed_qa", "information_extraction", "summarization"}
HH_RLHF_DATA_DIRS = ("harmless-base", "helpful-base")


def _file_list(data_files: DataFiles) -> list[str]:
    if isinstance(data_files, (str, Path)):
        return [str(data_files)]
    return [str(f) for f in data_files]


_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder_for(files: list[str]) -> str:
    """The packaged `datasets` builder that reads these local files (by extension, compression allowed)."""
    kinds = set()
    for name in files:
        suffixes = [s.lower() for s in Path(name).suffixes]
        if suffixes and suffixes[-1] in _COMPRESSION:
            suffixes = suffixes[:-1]
        kind = _FORMATS.get(suffixes[-1]) if suffixes else None
        if kind is None:
            raise DataError(f"hub: cannot tell the format of {name}: use .jsonl, .json, .parquet or .csv files (optionally .gz).")
        kinds.add(kind)
    if len(kinds) != 1:
        raise DataError(f"hub: data_files mix formats {sorted(kinds)}: {files}.")
    return kinds.pop()


@contextlib.contextmanager
def _offline_when_unreachable() -> Iterator[None]:
    """Make `datasets` use only its local cache when the Hub cannot be reached.

    Otherwise load_dataset retries name resolution for ~25 s before failing.
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    from rlhf_lib.models import hub_reachable

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1" or not hub_reachable()
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub_rows(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    data_files: DataFiles | None = None,
    data_dir: str | None = None,
    columns: Sequence[str] = (),
    fix: str = "",
) -> list[dict[str, Any]]:
    """Rows of a Hub dataset (or of local `data_files` in its format), checked for `columns`."""
    from datasets import load_dataset

    if data_files is not None:
        files = _file_list(data_files)
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            raise DataError(f"hub:{name}: data file(s) {missing} do not exist.")
        where = ", ".join(files)
        try:
            dataset = load_dataset(_builder_for(files), data_files=files, split="train")
        except DataError:
            raise
        except Exception as err:  # datasets raises many types for unreadable files
            raise DataError(f"hub:{name}: could not read {where} ({type(err).__name__}: {err}).") from err
    else:
        where = f"{name}" + (f" [{config}]" if config else "") + (f" {data_dir}/" if data_dir else "") + f" split={split}"
        try:
            with _offline_when_unreachable():
                dataset = load_dataset(name, config, split=split, data_dir=data_dir)
        except Exception as err:
            raise DataError(
                f"hub:{where} is not available here ({type(err).__name__}: {str(err)[:300]}). It needs network access "
                f"to the Hugging Face Hub once (then it is cached). Offline, use the BIG-bench source "
                f"(source='bigbench'), or pass data_files= with local files in the dataset's format{fix}."
            ) from err
    absent = [c for c in columns if c not in dataset.column_names]
    if absent:
        raise DataError(f"hub:{name}: {where} lacks column(s) {absent}; it has {dataset.column_names}.")
    return list(dataset)


def _text(row: Mapping[str, Any], key: str, source: str, index: int, *, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(f"{source}, row {index}: field '{key}' must be a non-empty string, got {value!r:.80}.")
    return value.strip()


def load_dolly(data_files: DataFiles | None = None, split: str = "train") -> ParseResult:
    """PROMPT_FEATURES demonstrations from databricks-dolly-15k (instruction, context, response, category).

    Prompts are context-first ("<context>\\n\\n<instruction>") like the offline source, so questions
    about one passage share a dedup prefix; closed-domain categories keep the context for grounding.
    """
    source = f"hub:{DOLLY}"
    rows = load_hub_rows(
        DOLLY, split=split, data_files=data_files, columns=("instruction", "context", "response", "category"),
        fix=" (JSON lines with instruction, context, response, category)",
    )  # fmt: skip
    result = ParseResult()
    for index, row in enumerate(rows):
        instruction = _text(row, "instruction", source, index)
        context = _text(row, "context", source, index, allow_empty=True)
        response = _text(row, "response", source, index, allow_empty=True)
        dolly_category = _text(row, "category", source, index)
        if dolly_category not in DOLLY_CATEGORIES:
            result.skips[f"dolly: unknown category '{dolly_category}'"] += 1
            continue
        if not response:
            result.skips["dolly: empty response"] += 1
            continue
        category = DOLLY_CATEGORIES[dolly_category]
        result.rows.append(
            {
                "id": f"dolly/{index}",
                "prompt": f"{context}\n\n{instruction}" if context else instruction,
                "reference": response,
                "task": f"dolly/{dolly_category}",
                "category": category,
                "source": source,
                "context": context if dolly_category in _GROUNDED else "",
                "allowed_labels": [],
                "split": "",
            }
        )
    return result


def _hh_subset(path: str) -> str:
    lowered = path.lower()
    return "harmless" if "harmless" in lowered else "helpful" if "helpful" in lowered else "other"


_ASSISTANT = "\n\nAssistant:"


def _hh_pairs(rows: list[dict[str, Any]], subset: str, source: str, tag: str, result: ParseResult) -> None:
    for index, row in enumerate(rows):
        chosen = _text(row, "chosen", source, index)
        rejected = _text(row, "rejected", source, index)
        # Both dialogues share everything up to the final assistant turn; that shared part is the prompt.
        cut = chosen.rfind(_ASSISTANT)
        prefix = chosen[:cut]
        if cut <= 0 or not rejected.startswith(prefix + _ASSISTANT):
            result.skips[f"hh-rlhf/{tag}: dialogues differ before the last assistant turn"] += 1
            continue
        answer_chosen = chosen[cut + len(_ASSISTANT) :].strip()
        answer_rejected = rejected[cut + len(_ASSISTANT) :].strip()
        if not answer_chosen or answer_chosen == answer_rejected:
            result.skips[f"hh-rlhf/{tag}: empty or identical answers"] += 1
            continue
        result.rows.append(
            {
                "id": f"hh-rlhf/{tag}/{index}",
                "prompt": prefix.strip(),
                "chosen": answer_chosen,
                "rejected": answer_rejected,
                "subset": subset,
                "source": source,
            }
        )


def load_hh_rlhf(
    data_files: DataFiles | None = None, split: str = "train", data_dirs: Sequence[str] = HH_RLHF_DATA_DIRS
) -> ParseResult:
    """PREFERENCE_PAIR_FEATURES from Anthropic/hh-rlhf's chosen/rejected dialogues.

    The prompt is the shared dialogue ("Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."); chosen and
    rejected are the two final assistant replies. The subset (harmless / helpful) comes from the data
    directory, or from each local file's path.
    """
    source = f"hub:{HH_RLHF}"
    result = ParseResult()
    fix = " (JSON lines with chosen, rejected)"
    if data_files is not None:
        for path in _file_list(data_files):
            rows = load_hub_rows(HH_RLHF, data_files=[path], columns=("chosen", "rejected"), fix=fix)
            _hh_pairs(rows, _hh_subset(path), source, Path(path).name, result)
    else:
        for data_dir in data_dirs:
            rows = load_hub_rows(HH_RLHF, split=split, data_dir=data_dir, columns=("chosen", "rejected"), fix=fix)
            _hh_pairs(rows, _hh_subset(data_dir), source, data_dir, result)
    return result


def load_truthful_qa(data_files: Mapping[str, DataFiles] | None = None, split: str = "validation") -> ParseResult:
    """TRUTHFULQA_FEATURES from truthful_qa's `generation` and `multiple_choice` configs, joined on the question.

    `data_files` = {"generation": ..., "multiple_choice": ...}; mc choices are the single-true `mc1_targets`.
    """
    source = f"hub:{TRUTHFUL_QA}"
    files = data_files or {}
    if data_files is not None and set(files) != {"generation", "multiple_choice"}:
        raise DataError(f"{source}: data_files needs the keys 'generation' and 'multiple_choice', got {sorted(files)}.")
    generation = load_hub_rows(
        TRUTHFUL_QA, config="generation", split=split, data_files=files.get("generation"),
        columns=("question", "best_answer", "correct_answers", "incorrect_answers"),
    )  # fmt: skip
    multiple_choice = load_hub_rows(
        TRUTHFUL_QA, config="multiple_choice", split=split, data_files=files.get("multiple_choice"),
        columns=("question", "mc1_targets"),
    )  # fmt: skip
    choices: dict[str, tuple[list[str], list[int]]] = {}
    for index, row in enumerate(multiple_choice):
        targets = row.get("mc1_targets")
        ok = isinstance(targets, Mapping) and isinstance(targets.get("choices"), list) and isinstance(targets.get("labels"), list)
        if not ok or not targets["choices"] or len(targets["choices"]) != len(targets["labels"]):
            raise DataError(f"{source} [multiple_choice], row {index}: malformed 'mc1_targets' {targets!r:.120}.")
        choices[_text(row, "question", source, index)] = (list(targets["choices"]), [int(x) for x in targets["labels"]])
    result = ParseResult()
    for index, row in enumerate(generation):
        question = _text(row, "question", source, index)
        if question not in choices:
            result.skips["truthful_qa: no multiple-choice entry"] += 1
            continue
        correct, incorrect = row.get("correct_answers"), row.get("incorrect_answers")
        if not isinstance(correct, list) or not isinstance(incorrect, list):
            raise DataError(f"{source} [generation], row {index}: 'correct_answers'/'incorrect_answers' must be lists.")
        mc_choices, mc_labels = choices[question]
        result.rows.append(
            {
                "id": f"truthful_qa/{index}",
                "question": question,
                "best_answer": _text(row, "best_answer", source, index),
                "correct_answers": [str(a).strip() for a in correct],
                "incorrect_answers": [str(a).strip() for a in incorrect],
                "mc_choices": mc_choices,
                "mc_labels": mc_labels,
                "source": source,
            }
        )
    return result


def load_real_toxicity_prompts(data_files: DataFiles | None = None, split: str = "train") -> ParseResult:
    """TOXICITY_FEATURES from allenai/real-toxicity-prompts: `prompt.text`, kind by `prompt.toxicity`.

    kind is "rtp_toxic" (Perspective toxicity >= 0.5), "rtp_nontoxic", or "rtp_unscored" (no score),
    so the analysis can stratify as the paper did.
    """
    source = f"hub:{REAL_TOXICITY_PROMPTS}"
    rows = load_hub_rows(
        REAL_TOXICITY_PROMPTS, split=split, data_files=data_files, columns=("prompt",),
        fix=" (JSON lines with prompt: {text, toxicity})",
    )  # fmt: skip
    result = ParseResult()
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, Mapping):
            raise DataError(f"{source}, row {index}: 'prompt' must be an object with 'text'.")
        text = _text(prompt, "text", source, index)
        toxicity = prompt.get("toxicity")
        kind = "rtp_unscored" if toxicity is None else "rtp_toxic" if float(toxicity) >= 0.5 else "rtp_nontoxic"
        result.rows.append({"id": f"rtp/{index}", "prompt": text, "kind": kind, "source": source})
    return result


def load_squad_v2(data_files: DataFiles | None = None, split: str = "validation") -> ParseResult:
    """QA_FEATURES from squad_v2 (id, title, context, question, answers{text, answer_start}).

    Unanswerable questions keep an empty answer list (the few-shot metric must handle "no answer").
    """
    source = f"hub:{SQUAD_V2}"
    rows = load_hub_rows(
        SQUAD_V2, split=split, data_files=data_files, columns=("context", "question", "answers"),
        fix=" (JSON lines or parquet with id, context, question, answers{text, answer_start})",
    )  # fmt: skip
    result = ParseResult()
    for index, row in enumerate(rows):
        answers = row.get("answers")
        if not isinstance(answers, Mapping) or not isinstance(answers.get("text"), list):
            raise DataError(f"{source}, row {index}: 'answers' must be an object with a 'text' list.")
        result.rows.append(
            {
                "id": f"squad_v2/{row.get('id') or index}",
                "context": _text(row, "context", source, index),
                "question": _text(row, "question", source, index),
                "answers": list(dict.fromkeys(str(a).strip() for a in answers["text"] if str(a).strip())),
                "subset": "squad_v2",
                "source": source,
            }
        )
    return result
