"""Offline source: human-written text from the BIG-bench 1.0.0 source distribution on PyPI.

The sdist (358 MB) is fetched once with pip into ``cache_root()/downloads`` (pip >= 26.3 refuses
it, so then pip 26.2.1, itself fetched by pip, does the download), its sha256 checked,
and only the task directories this study reads are stream-extracted (tarfile's ``data`` filter: no
member may land outside the cache) into ``cache_root()/bigbench/benchmark_tasks/<task>/``. A
manifest of every extracted file's size and sha256 lets the next call check the cache by content
(a second or two) instead of extracting again; an extraction that was interrupted leaves only a
``.partial-*`` directory, which the next call deletes before starting over.

When the sdist cannot be had (PyPI listed only bigbench 0.0.1 on 2026-12-05), a BIG-bench git
checkout serves instead: ``RLHF_BIGBENCH_TASKS=/path/to/BIG-bench`` (or its
``bigbench/benchmark_tasks``). Its files are read in place, and the sha256 of every task directory
used is recorded in the data's provenance, since a checkout has no published checksum.
Never ``pip install`` the sdist (its requirements pull TensorFlow), and never publish its files as
training data: they carry BIG-bench's canary string.

    from rlhf_lib.data.bigbench import ensure_bigbench_tasks, load_prompt_pool, parse_truthful_qa
    root = ensure_bigbench_tasks()                       # .../bigbench/benchmark_tasks
    pool = load_prompt_pool(root, max_prompt_chars=768)  # PROMPT_FEATURES rows + skip counts
    pool.rows[0]["category"], pool.skips                 # e.g. 'generation', Counter({...})
    truthful = parse_truthful_qa(root / "truthful_qa")   # 299 TRUTHFULQA_FEATURES rows

Parsers read each task's real file format. Rule for bad input: a file that is not valid JSON, or a
row missing a field the format requires, raises DataError naming the file and row; a well-formed
row that cannot become a useful example (empty target, no correct choice, unexpected template,
prompt over the length cap) is skipped and counted in ``ParseResult.skips`` under "task: reason".

Prompt layout: the task input comes FIRST and the task's short instruction after it
("<input>\\n\\n<instruction>"). Every prompt of one task shares its instruction, so an
instruction-first layout would make all prompts of a task near-duplicates under the paper's
long-common-prefix rule; input-first makes the dedup prefix the human-written input itself, which
also groups different questions on one passage together (so a passage never spans two splits).
natural_instructions' long crowdsourcing definitions (300-3,000 characters) are not included: they
would not fit the token caps of the small presets; the definition's own one-line "Prompt:" is used.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rlhf_lib.data.common import ParseResult, strip_quotes
from rlhf_lib.data.schema import CATEGORIES, DataError
from rlhf_lib.models import cache_root, sha256_file

BIGBENCH_VERSION = "1.0.0"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SOURCE = f"bigbench-{BIGBENCH_VERSION}"
MEMBER_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
MANIFEST = "manifest.json"
# A BIG-bench checkout (or its bigbench/benchmark_tasks directory) used instead of the sdist.
TASKS_DIR_ENV = "RLHF_BIGBENCH_TASKS"

# Top-level task directories this study reads (what ensure_bigbench_tasks extracts by default).
PROMPT_TASKS = (
    "natural_instructions",
    "topical_chat",
    "rephrase",
    "tense",
    "goal_step_wikihow",
    "general_knowledge",
    "known_unknowns",
    "qa_wikidata",
    "misconceptions",
    "intent_recognition",
    "emojis_emotion_prediction",
    "irony_identification",
    "disfl_qa",
    "factuality_of_summary",
)
EVAL_TASKS = ("truthful_qa", "hhh_alignment", "squad_shifts", "muslim_violence_bias", "bbq_lite_json")
TASKS = PROMPT_TASKS + EVAL_TASKS


# ---------------------------------------------------------------------------------------------
# Download, checksum, extraction
# ---------------------------------------------------------------------------------------------


def bigbench_cache_dir() -> Path:
    return cache_root() / "bigbench"


def default_sdist_path() -> Path:
    return cache_root() / "downloads" / SDIST_NAME


# pip >= 26.3 prepares the sdist's metadata even with --no-deps and then refuses it, because
# bigbench declares a direct-URL requirement (bleurt @ file://...); pip 26.2.1 has no such check.
_PIP_REFUSAL = "cannot declare direct URL dependencies"
FALLBACK_PIP = "26.2.1"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


def _installed_pip_refuses() -> bool:
    """Is the running interpreter's pip one that refuses the sdist (>= 26.3)?"""
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return numbers >= (26, 3)


def _download_with_fallback_pip(args: list[str]) -> subprocess.CompletedProcess | None:
    """Run pip FALLBACK_PIP straight from its wheel (fetched by the installed pip); None if unavailable."""
    with tempfile.TemporaryDirectory() as work:
        fetched = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", f"pip=={FALLBACK_PIP}", "-d", work])
        wheels = list(Path(work).glob(f"pip-{FALLBACK_PIP}-*.whl"))
        if fetched.returncode != 0 or not wheels:
            return None
        print(f"The installed pip refuses this sdist's metadata; downloading with pip {FALLBACK_PIP}.", flush=True)
        return _run([sys.executable, str(wheels[0] / "pip"), *args])


def download_sdist(dest_dir: Path) -> Path:
    """`pip download` the sdist (no dependencies, no wheel build) into `dest_dir`.

    pip >= 26.3 refuses this sdist (see _PIP_REFUSAL); then the installed pip fetches the pip
    FALLBACK_PIP wheel, and that pip, run straight from its wheel, downloads the sdist.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    args = ["download", "--no-deps", "--no-binary", ":all:", f"bigbench=={BIGBENCH_VERSION}", "-d", str(dest_dir)]
    print(f"Downloading the BIG-bench {BIGBENCH_VERSION} sdist (358 MB, once) with pip into {dest_dir}", flush=True)
    done = None if _installed_pip_refuses() else _run([sys.executable, "-m", "pip", *args])
    if done is None or (done.returncode != 0 and _PIP_REFUSAL in (done.stderr + done.stdout)):
        done = _download_with_fallback_pip(args) or done or _run([sys.executable, "-m", "pip", *args])
    target = dest_dir / SDIST_NAME
    if done.returncode != 0 or not target.exists():
        tail = (done.stderr or done.stdout or "").strip()[-1500:]
        not_listed = "No matching distribution" in tail
        why = (
            f"Your package index does not list bigbench {BIGBENCH_VERSION} (PyPI listed only 0.0.1 on 2026-12-05). "
            if not_listed else "Offline? "
        )
        raise DataError(
            f"bigbench: could not download {SDIST_NAME} with pip (exit {done.returncode}).\n{tail}\n"
            f"{why}Either copy {SDIST_NAME} (sha256 {SDIST_SHA256}) from a machine or mirror that has it "
            f"(`pip download --no-deps --no-binary :all: bigbench=={BIGBENCH_VERSION}`, with pip <= {FALLBACK_PIP}) "
            f"to {target}, or clone https://github.com/google/BIG-bench and set {TASKS_DIR_ENV} to the clone "
            "(its files are read in place and their sha256 recorded in the data's provenance)."
        )
    return target


def verify_sdist(path: Path, expected_sha256: str = SDIST_SHA256) -> None:
    """Raise DataError (after deleting the file) unless `path` has the published sha256."""
    if not path.exists():
        raise DataError(f"bigbench: {path} does not exist.")
    actual = sha256_file(path)
    if actual != expected_sha256:
        size = path.stat().st_size
        path.unlink()
        raise DataError(
            f"bigbench: {path} ({size} bytes) has sha256 {actual}, expected {expected_sha256}: a truncated or "
            "corrupted download. The file was deleted; run again to download it afresh."
        )


class _ProgressReader:
    """A read-only file wrapper that advances a tqdm bar by compressed bytes read."""

    def __init__(self, handle, bar):
        self.handle, self.bar = handle, bar

    def read(self, size: int = -1) -> bytes:
        block = self.handle.read(size)
        self.bar.update(len(block))
        return block


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"sdist_sha256": None, "tasks": {}}


def _task_intact(root: Path, manifest: dict[str, Any], task: str) -> bool:
    """Every file the manifest lists for `task` exists with its recorded size and sha256 (an edit that keeps
    the size is caught too; a manifest from before hashes were recorded counts as not intact)."""
    files = manifest.get("tasks", {}).get(task)
    if not files:
        return False
    base = root / "benchmark_tasks"
    for rel, entry in files.items():
        path = base / rel
        if not isinstance(entry, dict) or not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
        if sha256_file(path) != entry.get("sha256"):
            return False
    return True


def task_digests(root: Path, tasks: Iterable[str]) -> dict[str, str]:
    """sha256 of each task directory's content (its files' relative paths and bytes, in sorted order)."""
    digests = {}
    for task in tasks:
        digest = hashlib.sha256()
        for path in sorted(p for p in (root / task).rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
        digests[task] = digest.hexdigest()
    return digests


def checkout_tasks_dir(path: str | Path, tasks: Iterable[str] = TASKS) -> Path:
    """The benchmark_tasks directory of a BIG-bench checkout (its top or the directory itself), checked to
    hold every task in `tasks`; a DataError says which are missing."""
    given = Path(path).expanduser().resolve()
    root = given / "bigbench" / "benchmark_tasks" if (given / "bigbench" / "benchmark_tasks").is_dir() else given
    if not root.is_dir():
        raise DataError(f"bigbench: {TASKS_DIR_ENV}={path} is not a directory.")
    missing = [task for task in tasks if not (root / task).is_dir()]
    if missing:
        raise DataError(
            f"bigbench: {root} lacks the task directories {missing}. {TASKS_DIR_ENV} must name a BIG-bench checkout "
            "(git clone https://github.com/google/BIG-bench) or its bigbench/benchmark_tasks directory."
        )
    return root


def _extract_tasks(sdist: Path, tasks: list[str], root: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Stream the tarball once, extracting members under the requested task directories."""
    from tqdm import tqdm  # plain tqdm: tqdm.auto warns in notebooks without ipywidgets

    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    found: dict[str, dict[str, dict[str, Any]]] = {task: {} for task in tasks}
    try:
        with open(sdist, "rb") as raw, tqdm(
            total=sdist.stat().st_size, unit="B", unit_scale=True, mininterval=2.0,
            desc=f"extracting {len(tasks)} BIG-bench tasks",
        ) as bar:
            try:
                with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|gz") as tar:
                    for member in tar:
                        if not member.name.startswith(MEMBER_PREFIX):
                            continue
                        relative = member.name[len(MEMBER_PREFIX) :]
                        task = relative.split("/", 1)[0]
                        if task not in found or not relative:
                            continue
                        try:
                            # The "data" filter refuses absolute paths, "..", links leaving the
                            # destination and special files: nothing can be written outside `tmp`.
                            tar.extract(member.replace(name=relative, deep=False), tmp, filter="data")
                        except tarfile.FilterError as err:
                            raise DataError(
                                f"bigbench: {sdist}: member '{member.name}' was refused by the tarfile data filter "
                                f"({err}); the archive is not the published sdist. Delete {sdist} and run again."
                            ) from err
                        if member.isfile():
                            found[task][relative] = {"size": member.size,
                                                     "sha256": sha256_file(tmp / relative)}
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                raise DataError(
                    f"bigbench: {sdist} is truncated or corrupt ({type(err).__name__}: {err}). "
                    f"Delete {sdist} and run again to download it afresh."
                ) from err
        missing = [task for task, files in found.items() if not files]
        if missing:
            raise DataError(f"bigbench: {sdist} has no task directories {missing} under {MEMBER_PREFIX}.")
        final_base = root / "benchmark_tasks"
        final_base.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            final = final_base / task
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / task, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return found


def ensure_bigbench_tasks(
    tasks: list[str] | None = None,
    *,
    sdist: Path | None = None,
    expected_sha256: str = SDIST_SHA256,
    cache_dir: Path | None = None,
) -> Path:
    """Directory holding the extracted `tasks` (default: every task this study reads).

    Downloads the sdist with pip when it is missing, checks its sha256, and extracts only the tasks
    not already intact in the cache. With $RLHF_BIGBENCH_TASKS set (and no `sdist` given), the checkout it
    names is used in place. `sdist`, `expected_sha256` and `cache_dir` exist for tests.
    """
    wanted = list(dict.fromkeys(tasks or TASKS))
    for task in wanted:
        if not task or "/" in task or task.startswith("."):
            raise DataError(f"bigbench: '{task}' is not a top-level task directory name.")
    if sdist is None and os.environ.get(TASKS_DIR_ENV):
        return checkout_tasks_dir(os.environ[TASKS_DIR_ENV], wanted)
    root = cache_dir or bigbench_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root)
    if manifest.get("sdist_sha256") not in (None, expected_sha256):
        manifest = {"sdist_sha256": None, "tasks": {}}  # cache from another archive: rebuild it
    missing = [task for task in wanted if not _task_intact(root, manifest, task)]
    if not missing:
        return root / "benchmark_tasks"
    for stale in root.glob(".partial-*"):  # left by an interrupted extraction
        shutil.rmtree(stale, ignore_errors=True)
    path = sdist or default_sdist_path()
    if not path.exists():
        if sdist is not None:
            raise DataError(f"bigbench: {path} does not exist.")
        path = download_sdist(path.parent)
    verify_sdist(path, expected_sha256)
    found = _extract_tasks(path, missing, root)
    manifest = {"sdist_sha256": expected_sha256, "tasks": {**manifest.get("tasks", {}), **found}}
    tmp_manifest = root / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp_manifest, root / MANIFEST)  # the manifest is written last: it marks success
    return root / "benchmark_tasks"


# ---------------------------------------------------------------------------------------------
# Reading task files
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# natural_instructions: 61 subtasks with human-written instructions and outputs
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The widened generative mix (one parser per task format)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------


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

