"""natural_instructions: 61 subtasks with human-written instructions and outputs, parsed into prompt rows.

Each subtask's use-case category, groundedness and label set come from NI_SUBTASKS. Its long
crowdsourcing definitions (300-3,000 characters) are not included: they would not fit the token caps
of the small presets; the definition's own one-line "Prompt:" is used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rlhf_lib.data.bigbench.fetch import SOURCE
from rlhf_lib.data.bigbench.taskfile import _Collector, _targets, read_task_json
from rlhf_lib.data.common import ParseResult
from rlhf_lib.data.schema import DataError

# Subtask number -> (InstructGPT use-case category, grounded, label-set task).
# grounded: the answer must be supported by a passage inside the input (closed-domain), so the
# input is stored as `context` for the hallucination measure. MC-TACO and CosmosQA answers need
# commonsense beyond the sentence, so they are closed QA in form but not grounded.
# label-set: the targets come from a small fixed set, stored as `allowed_labels`.
NI_SUBTASKS: dict[str, tuple[str, bool, bool]] = {
    "001": ("generation", True, False),  # quoref question generation about a passage
    "002": ("closed_qa", True, False),  # quoref: answer as a span of the passage
    "003": ("generation", False, False),  # mctaco question generation (x5 temporal aspects)
    "004": ("closed_qa", False, False),  # mctaco answers (commonsense durations etc.)
    "005": ("other", False, False),  # mctaco wrong-answer generation (x5)
    "006": ("generation", False, False),
    "007": ("closed_qa", False, False),
    "008": ("other", False, False),
    "009": ("generation", False, False),
    "010": ("closed_qa", False, False),
    "011": ("other", False, False),
    "012": ("generation", False, False),
    "013": ("closed_qa", False, False),
    "014": ("other", False, False),
    "015": ("generation", False, False),
    "016": ("closed_qa", False, False),
    "017": ("other", False, False),
    "018": ("classification", False, True),  # mctaco yes/no judgements
    "019": ("classification", False, True),
    "020": ("classification", False, True),
    "021": ("classification", False, True),
    "022": ("classification", False, True),  # cosmosqa: is the passage inappropriate?
    "023": ("generation", False, False),  # cosmosqa question generation
    "024": ("closed_qa", False, False),  # cosmosqa answers need commonsense
    "025": ("other", False, False),  # cosmosqa incorrect answer
    "026": ("generation", True, False),  # drop question generation
    "027": ("classification", True, True),  # drop answer type: Number / Date / Span
    "028": ("closed_qa", True, False),  # drop answer
    "029": ("generation", False, False),  # winogrande: write question-answer pairs
    "030": ("generation", False, False),
    "031": ("generation", False, False),
    "032": ("generation", False, False),
    "033": ("closed_qa", True, False),  # winogrande: fill the blank from the sentence
    "034": ("rewrite", False, False),  # winogrande: minimally edit the question
    "035": ("rewrite", False, False),
    "036": ("brainstorming", False, False),  # qasc: topic words for a fact (many valid answers)
    "037": ("generation", False, False),  # qasc: write a related fact
    "038": ("generation", False, False),  # qasc: combine two facts into a conclusion
    "039": ("extraction", True, False),  # qasc: overlapping word of two sentences
    "040": ("rewrite", False, False),  # qasc: rearrange a fact into a question
    "041": ("closed_qa", True, False),  # qasc: answer from the given fact
    "042": ("other", False, False),  # qasc: incorrect option
    "043": ("classification", False, True),  # multiple choice A-E with masked words
    "044": ("extraction", True, False),  # essential words of a question
    "045": ("rewrite", False, False),  # paraphrase a sentence
    "046": ("classification", False, True),  # question typing (13 types)
    "047": ("classification", False, True),  # science multiple choice A-D
    "048": ("generation", True, False),  # multirc question generation
    "049": ("extraction", True, False),  # multirc: which sentences are needed
    "050": ("classification", True, True),  # multirc answerability
    "051": ("closed_qa", True, False),
    "052": ("classification", True, True),  # multirc: is the question bad?
    "053": ("rewrite", True, False),  # multirc: correct a bad question
    "054": ("closed_qa", True, False),
    "055": ("other", True, False),  # multirc: write an incorrect answer
    "056": ("classification", True, True),
    "057": ("classification", True, True),
    "058": ("closed_qa", True, False),  # multirc: list the correct options
    "059": ("generation", False, False),  # ropes: write a story from a background paragraph
    "060": ("generation", True, False),  # ropes question generation
    "061": ("closed_qa", True, False),  # ropes answer span
}
_MAX_LABELS = 20  # a label-set task with more distinct targets than this is a parsing error


def _label(text: str) -> str:
    return text.strip().rstrip(".").strip()


def _ni_instruction(data: dict[str, Any], path: Path) -> str:
    """The one-line "Prompt:" of a subtask's crowdsourcing instructions."""
    prefix = data.get("task_prefix") or data.get("description") or ""
    if not isinstance(prefix, str) or not prefix.strip():
        raise DataError(f"{SOURCE}: {path} has neither 'task_prefix' nor 'description'.")
    if "Prompt:" in prefix:
        return prefix.rsplit("Prompt:", 1)[1].strip()
    return prefix.replace("Definition:", "").strip()


def _options_suffix(instruction: str, labels: list[str]) -> str:
    """List the allowed labels unless the instruction already names all of them."""
    if all(re.search(rf"\b{re.escape(label)}\b", instruction) for label in labels):
        return ""
    return " Answer with one of: " + ", ".join(labels) + "."


def parse_natural_instructions(task_dir: Path, max_prompt_chars: int | None = None) -> ParseResult:
    """Demonstrations and prompts from every `subtaskNNN_*/task.json` under `task_dir`."""
    subtasks = sorted(p for p in Path(task_dir).glob("subtask*") if p.is_dir())
    if not subtasks:
        raise DataError(f"{SOURCE}: {task_dir} has no subtask directories.")
    result = ParseResult()
    for subdir in subtasks:
        number = subdir.name[len("subtask") : len("subtask") + 3]
        if number not in NI_SUBTASKS:
            raise DataError(
                f"{SOURCE}: {subdir} has no use-case category; add subtask {number} to NI_SUBTASKS in {__file__}."
            )
        category, grounded, label_set = NI_SUBTASKS[number]
        path = subdir / "task.json"
        data = read_task_json(path)
        instruction = _ni_instruction(data, path)
        task = f"natural_instructions/{subdir.name}"
        examples = data["examples"]
        targets = [_targets(example, path, index) for index, example in enumerate(examples)]
        labels: list[str] = []
        if label_set:
            labels = sorted({_label(t) for ts in targets for t in ts})
            if len(labels) > _MAX_LABELS:
                raise DataError(f"{SOURCE}: {path}: {len(labels)} distinct targets for a label-set task: {labels[:8]}...")
        suffix = _options_suffix(instruction, labels) if labels else ""
        collect = _Collector(task, max_prompt_chars)
        for index, (example, ts) in enumerate(zip(examples, targets, strict=True)):
            if not ts:
                collect.skip("empty target")
                continue
            text = example["input"].strip()
            prompt = f"{text}\n\n{instruction}{suffix}"
            reference = _label(ts[0]) if labels else ts[0]
            collect.add(index, prompt, reference, category, context=text if grounded else "", labels=labels)
        result.extend(collect.result)
    return result

