"""Tests of the data layer: schema errors, BIG-bench parsers and extraction, splits, Hub adapters, StudyData.

Fixture files are written by the tests in each source's real format (task.json layouts of BIG-bench
1.0.0, the Hub datasets' column layouts). Only the test marked `slow` reads the real 358 MB sdist
(downloaded once into the shared cache; ~20 s after that).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from bigbench_fixture import _task, _words, write_bigbench_tree

from rlhf_lib.config import load_preset
from rlhf_lib.data import bigbench, hub
from rlhf_lib.data.common import normalise_for_dedup, truncate_reference
from rlhf_lib.data.schema import (
    CATEGORIES,
    PROMPT_FEATURES,
    SPLITS,
    TRUTHFULQA_FEATURES,
    DataError,
    to_dataset,
    validate_rows,
)
from rlhf_lib.data.splits import check_no_leakage, make_splits, near_duplicate_groups, validation_split
from rlhf_lib.data.study import StudyData, build_data_stage, build_study_data, category_mix_table
from rlhf_lib.models import sha256_file
from rlhf_lib.pipeline import RunPaths


@pytest.fixture()
def bb_root(tmp_path: Path) -> Path:
    return write_bigbench_tree(tmp_path / "benchmark_tasks")


def _tarball(tree: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A tar.gz laid out like the sdist: bigbench-1.0.0/bigbench/benchmark_tasks/<task>/..."""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree, arcname=bigbench.MEMBER_PREFIX.rstrip("/"))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


# ---------------------------------------------------------------------------------------------
# Schema and text helpers
# ---------------------------------------------------------------------------------------------


def _prompt_row(**overrides: object) -> dict:
    row = {"id": "x/0", "prompt": "p", "reference": "r", "task": "t", "category": "generation", "source": "fixture",
           "context": "", "allowed_labels": [], "split": ""}  # fmt: skip
    row.update(overrides)
    return row


def test_schema_errors_name_the_row():
    rows = [_prompt_row(), _prompt_row(id="x/1"), {k: v for k, v in _prompt_row().items() if k != "reference"}]
    with pytest.raises(DataError, match=r"fixture-src, row 2: missing field\(s\) \['reference'\]"):
        validate_rows(rows, PROMPT_FEATURES, "fixture-src")
    with pytest.raises(DataError, match=r"row 1: field 'allowed_labels' must be a list"):
        validate_rows([_prompt_row(), _prompt_row(allowed_labels="Yes")], PROMPT_FEATURES, "fixture-src")
    with pytest.raises(DataError, match="produced no rows"):
        to_dataset([], TRUTHFULQA_FEATURES, "empty-src")


def test_truncate_reference_prefers_sentence_ends():
    text = "First sentence here. Second sentence is much longer than the budget allows for sure."
    assert truncate_reference(text, 6) == "First sentence here."  # 24 characters of budget
    assert truncate_reference("one two three four five six seven", 4) == "one two three"
    assert truncate_reference("short", 10) == "short"
    assert normalise_for_dedup("  The Cat -- sat!") == "the cat sat"


# ---------------------------------------------------------------------------------------------
# BIG-bench parsers on fixture task files
# ---------------------------------------------------------------------------------------------


def test_natural_instructions_layout_categories_labels(bb_root: Path):
    result = bigbench.parse_natural_instructions(bb_root / "natural_instructions")
    by_task = Counter(r["task"].split("/")[1] for r in result.rows)
    assert by_task == {
        "subtask002_quoref_answer_generation": 12,
        "subtask018_mctaco_temporal_reasoning_presence": 12,
        "subtask059_ropes_story_generation": 12,
        "subtask045_miscellaneous_sentence_paraphrasing": 12,
    }
    qa = next(r for r in result.rows if "subtask002" in r["task"])
    # Input first, then the one-line instruction (not the long definition).
    assert qa["prompt"].startswith("Passage: ")
    assert qa["prompt"].endswith("Answer the given question. Your answer must be a single span in the passage.")
    assert "Definition" not in qa["prompt"]
    assert qa["category"] == "closed_qa" and qa["context"].startswith("Passage: ")
    yes_no = next(r for r in result.rows if "subtask018" in r["task"])
    assert yes_no["category"] == "classification"
    assert yes_no["allowed_labels"] == ["No", "Yes"] and yes_no["reference"] in ("Yes", "No")
    story = next(r for r in result.rows if "subtask059" in r["task"])
    assert story["category"] == "generation" and story["context"] == "" and story["allowed_labels"] == []
    assert next(r for r in result.rows if "subtask045" in r["task"])["category"] == "rewrite"
    to_dataset(result.rows, PROMPT_FEATURES, "fixture")  # every row fits the schema


def test_natural_instructions_bad_input(bb_root: Path):
    path = bb_root / "natural_instructions" / "subtask059_ropes_story_generation" / "task.json"
    data = json.loads(path.read_text())
    data["examples"][3] = {"target": ["no input"]}
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"subtask059_ropes_story_generation/task.json, row 3: missing string field 'input'"):
        bigbench.parse_natural_instructions(bb_root / "natural_instructions")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        bigbench.parse_natural_instructions(bb_root / "natural_instructions")
    path.parent.rename(path.parent.with_name("subtask999_made_up"))
    with pytest.raises(DataError, match="subtask 999 to NI_SUBTASKS"):
        bigbench.parse_natural_instructions(bb_root / "natural_instructions")


def test_natural_instructions_skips_are_counted_and_length_capped(bb_root: Path):
    path = bb_root / "natural_instructions" / "subtask045_miscellaneous_sentence_paraphrasing" / "task.json"
    data = json.loads(path.read_text())
    data["examples"][0]["target"] = []
    path.write_text(json.dumps(data))
    result = bigbench.parse_natural_instructions(bb_root / "natural_instructions", max_prompt_chars=200)
    assert result.skips["natural_instructions/subtask045_miscellaneous_sentence_paraphrasing: empty target"] == 1
    assert result.skips["natural_instructions/subtask002_quoref_answer_generation: prompt over max_prompt_tokens"] == 12
    assert all(len(r["prompt"]) <= 200 for r in result.rows)


def test_widened_mix_parsers(bb_root: Path):
    pool = bigbench.load_prompt_pool(bb_root)
    by_task = {task: [r for r in pool.rows if r["task"] == task] for task in {r["task"] for r in pool.rows}}
    chat = by_task["topical_chat"]
    assert len(chat) == 12  # one example per conversation
    assert chat[0]["category"] == "chat" and chat[0]["prompt"].endswith("Write B's next reply in this conversation.")
    assert chat[0]["prompt"].count("\n") == 5 and not chat[0]["reference"].startswith('"')  # 4 turns; quotes stripped
    assert by_task["rephrase"][0]["prompt"].startswith("Sentence: ") and "Keyword: " in by_task["rephrase"][0]["prompt"]
    tense = {r["id"]: r for r in by_task["tense"]}
    assert tense["tense/12"]["prompt"] == "He is riding a horse.\n\nChange the tense of this sentence to future continuous."
    assert by_task["goal_step_wikihow/step_inference"][0]["category"] == "brainstorming"
    assert by_task["general_knowledge"][0]["category"] == "open_qa" and by_task["general_knowledge"][0]["reference"] != "two"
    assert {r["category"] for r in by_task["qa_wikidata"]} == {"open_qa"}
    assert set(by_task["misconceptions"][0]["allowed_labels"]) == {"T", "F"}
    assert by_task["emojis_emotion_prediction"][0]["reference"] == "joy"
    assert by_task["irony_identification"][0]["allowed_labels"] == ["ironic", "not ironic"]
    disfl = by_task["disfl_qa"][0]
    assert disfl["category"] == "closed_qa" and disfl["prompt"].startswith("Context: ") and disfl["context"]
    xsum = by_task["factuality_of_summary/xsum"][0]
    assert xsum["category"] == "summarization" and xsum["context"] and xsum["prompt"].startswith("Article: ")
    assert {r["category"] for r in pool.rows} <= set(CATEGORIES)
    # A multiple-choice row with no correct choice is counted, not silently lost.
    path = bb_root / "general_knowledge" / "task.json"
    data = json.loads(path.read_text())
    data["examples"][0]["target_scores"] = {"a": 0, "b": 0}
    path.write_text(json.dumps(data))
    assert bigbench.parse_general_knowledge(bb_root / "general_knowledge").skips == {"general_knowledge: no single correct choice": 1}
    data["examples"][1].pop("target_scores")
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"general_knowledge/task.json, row 1: missing or malformed 'target_scores'"):
        bigbench.parse_general_knowledge(bb_root / "general_knowledge")


def test_evaluation_set_parsers(bb_root: Path):
    truthful = bigbench.parse_truthful_qa(bb_root / "truthful_qa")
    assert len(truthful) == 12
    assert truthful[0]["mc_labels"] == [1, 0, 0] and truthful[0]["mc_choices"][0] == "Nothing happens."
    assert truthful[0]["incorrect_answers"][1] == "You die."
    pairs = bigbench.parse_hhh_alignment(bb_root / "hhh_alignment")
    assert Counter(p["subset"] for p in pairs) == {"harmless": 4, "helpful": 3, "honest": 3, "other": 2}
    assert pairs[0]["chosen"] == "good 0" and pairs[0]["rejected"] == "bad 0"
    qa, paragraphs = bigbench.parse_squad_shifts(bb_root / "squad_shifts")
    assert len(qa) == 75 and len(paragraphs) == 75
    assert len(qa[0]["answers"]) == 1  # duplicate annotator answers collapsed
    assert set(Counter(q["subset"] for q in qa)) == set(bigbench.SQUAD_SUBSETS)
    toxicity = bigbench.parse_toxicity_prompts(bb_root)
    kinds = Counter(r["kind"] for r in toxicity.rows)
    # 3 distinct harmless requests (one repeated), 2 religions x 2 numbers x 2 verbs, 2 negative BBQ questions.
    assert kinds == {"harmful_request": 3, "violence_continuation": 8, "stereotype_question": 2}
    assert "Two Muslims walked into a" in {r["prompt"] for r in toxicity.rows}
    # Broken files name themselves.
    (bb_root / "hhh_alignment" / "honest" / "task.json").write_text(json.dumps(_task([{"input": "q", "target_scores": {"a": 1, "b": 1}}])))
    with pytest.raises(DataError, match=r"honest/task.json, row 0: expected one chosen and one rejected"):
        bigbench.parse_hhh_alignment(bb_root / "hhh_alignment")
    (bb_root / "muslim_violence_bias" / "task.py").write_text("x = 1\n")
    with pytest.raises(DataError, match=r"task.py: no assignment to \['numbers', 'verbs'\]"):
        bigbench.parse_toxicity_prompts(bb_root)


# ---------------------------------------------------------------------------------------------
# Download, checksum and extraction (on a fixture tarball in the sdist's layout)
# ---------------------------------------------------------------------------------------------


def test_extraction_is_cached_and_resumes_after_interruption(bb_root: Path, tmp_path: Path, monkeypatch):
    sdist = _tarball(bb_root, tmp_path / "fixture-sdist.tar.gz")
    digest = sha256_file(sdist)
    cache = tmp_path / "cache"
    # An extraction interrupted half-way leaves nothing usable behind ...
    real_extract = tarfile.TarFile.extract
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # some files already written to the temporary directory
            raise KeyboardInterrupt
        return real_extract(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bigbench.ensure_bigbench_tasks(["tense", "rephrase"], sdist=sdist, expected_sha256=digest, cache_dir=cache)
    assert calls["n"] == 4 and not (cache / bigbench.MANIFEST).exists() and not list(cache.glob(".partial-*"))
    assert not (cache / "benchmark_tasks" / "tense").exists()
    (cache / ".partial-stale").mkdir()  # e.g. from a killed process
    monkeypatch.setattr(tarfile.TarFile, "extract", real_extract)
    # ... and the rerun starts cleanly.
    root = bigbench.ensure_bigbench_tasks(["tense", "rephrase"], sdist=sdist, expected_sha256=digest, cache_dir=cache)
    assert (root / "tense" / "task.json").is_file() and not (root / "topical_chat").exists()
    assert not list(cache.glob(".partial-*"))
    manifest = json.loads((cache / bigbench.MANIFEST).read_text())
    assert set(manifest["tasks"]) == {"tense", "rephrase"} and manifest["sdist_sha256"] == digest

    # Second call: instant, the archive is not even opened.
    def boom(*args, **kwargs):
        raise AssertionError("re-extracted a cached task")

    monkeypatch.setattr(bigbench.fetch, "_extract_tasks", boom)
    started = time.perf_counter()
    assert bigbench.ensure_bigbench_tasks(["tense"], sdist=sdist, expected_sha256=digest, cache_dir=cache) == root
    assert time.perf_counter() - started < 0.5
    # A damaged cached file is noticed and only its task is extracted again ...
    (root / "tense" / "task.json").write_text("{}")
    with pytest.raises(AssertionError, match="re-extracted"):
        bigbench.ensure_bigbench_tasks(["tense"], sdist=sdist, expected_sha256=digest, cache_dir=cache)
    # ... and so is an edit that keeps the file's size (the manifest holds each file's sha256).
    rephrase = root / "rephrase" / "task.json"
    text = rephrase.read_text()
    i = text.index("a")
    rephrase.write_text(text[:i] + "b" + text[i + 1 :])
    assert rephrase.stat().st_size == len(text.encode())
    with pytest.raises(AssertionError, match="re-extracted"):
        bigbench.ensure_bigbench_tasks(["rephrase"], sdist=sdist, expected_sha256=digest, cache_dir=cache)


def test_checksum_mismatch_deletes_and_explains(bb_root: Path, tmp_path: Path):
    sdist = _tarball(bb_root, tmp_path / "bigbench-1.0.0.tar.gz")
    with pytest.raises(DataError, match=r"bigbench-1.0.0.tar.gz .* has sha256 .* expected 1bb398a5.*run again to download"):
        bigbench.ensure_bigbench_tasks(["tense"], sdist=sdist, cache_dir=tmp_path / "cache")
    assert not sdist.exists()
    with pytest.raises(DataError, match="does not exist"):
        bigbench.ensure_bigbench_tasks(["tense"], sdist=sdist, cache_dir=tmp_path / "cache")


def test_truncated_tarball_raises(bb_root: Path, tmp_path: Path):
    sdist = _tarball(bb_root, tmp_path / "full.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(sdist.read_bytes()[: sdist.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        bigbench.ensure_bigbench_tasks(
            ["truthful_qa"], sdist=truncated, expected_sha256=sha256_file(truncated), cache_dir=tmp_path / "cache"
        )
    assert not list((tmp_path / "cache").glob(".partial-*"))


def test_data_filter_blocks_path_traversal(bb_root: Path, tmp_path: Path):
    evil = bigbench.MEMBER_PREFIX + "tense/../../../../escaped.txt"
    sdist = _tarball(bb_root, tmp_path / "evil.tar.gz", extra={evil: b"owned"})
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(DataError, match="refused by the tarfile data filter"):
        bigbench.ensure_bigbench_tasks(["tense"], sdist=sdist, expected_sha256=sha256_file(sdist), cache_dir=cache)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_missing_task_is_an_error(bb_root: Path, tmp_path: Path):
    sdist = _tarball(bb_root, tmp_path / "s.tar.gz")
    with pytest.raises(DataError, match=r"no task directories \['no_such_task'\]"):
        bigbench.ensure_bigbench_tasks(["no_such_task"], sdist=sdist, expected_sha256=sha256_file(sdist), cache_dir=tmp_path / "c")


class _Done:
    def __init__(self, returncode: int, stderr: str = ""):
        self.returncode, self.stdout, self.stderr = returncode, "", stderr


def test_download_reports_pip_failure(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(bigbench.fetch, "_installed_pip_refuses", lambda: False)
    # The release is gone from the index (as on PyPI since 2026-12): the message says so and names both ways out.
    monkeypatch.setattr(bigbench.fetch, "_run", lambda command: _Done(1, "ERROR: No matching distribution found for bigbench==1.0.0"))
    with pytest.raises(DataError, match=r"(?s)could not download .*No matching distribution.*does not list bigbench 1.0.0"
                                        r".*sha256 1bb398a5.*RLHF_BIGBENCH_TASKS"):
        bigbench.download_sdist(tmp_path / "downloads")
    monkeypatch.setattr(bigbench.fetch, "_run", lambda command: _Done(1, "ERROR: Could not connect to pypi.org"))
    with pytest.raises(DataError, match=r"(?s)Could not connect.*Offline\? Either copy"):
        bigbench.download_sdist(tmp_path / "downloads")


def test_a_checkout_serves_when_the_sdist_cannot_be_had(bb_root: Path, tmp_path: Path, monkeypatch):
    """RLHF_BIGBENCH_TASKS names a BIG-bench clone: read in place, nothing downloaded, content hashes recorded."""
    clone = tmp_path / "BIG-bench"
    shutil.copytree(bb_root, clone / "bigbench" / "benchmark_tasks")
    monkeypatch.setattr(bigbench.fetch, "download_sdist", lambda dest: pytest.fail("downloaded although a checkout was given"))
    monkeypatch.setenv(bigbench.TASKS_DIR_ENV, str(clone))
    root = bigbench.ensure_bigbench_tasks(cache_dir=tmp_path / "cache")
    assert root == (clone / "bigbench" / "benchmark_tasks").resolve()
    data = build_study_data(load_preset("micro"))
    provenance = data.info["provenance"]
    assert provenance["checkout"] == str(root) and set(provenance["tasks_sha256"]) == set(bigbench.TASKS)
    before = provenance["tasks_sha256"]["tense"]
    (root / "tense" / "task.json").write_text((root / "tense" / "task.json").read_text().replace("a", "b", 1))
    after = bigbench.task_digests(root, ["tense", "rephrase"])
    assert after["tense"] != before and after["rephrase"] == provenance["tasks_sha256"]["rephrase"]
    shutil.rmtree(root / "truthful_qa")
    with pytest.raises(DataError, match=r"lacks the task directories \['truthful_qa'\].*git clone"):
        bigbench.ensure_bigbench_tasks(cache_dir=tmp_path / "cache")


def test_download_falls_back_to_older_pip_when_refused(tmp_path: Path, monkeypatch):
    """pip >= 26.3 refuses BIG-bench's direct-URL requirement; the fallback pip runs from its wheel."""
    dest = tmp_path / "downloads"
    commands: list[list[str]] = []

    def fake_run(command: list[str]) -> _Done:
        commands.append(command)
        if command[1:3] == ["-m", "pip"] and "bigbench==1.0.0" in command:
            return _Done(1, "ERROR: Distributions from PyPI cannot declare direct URL dependencies.")
        if "pip==" + bigbench.FALLBACK_PIP in command:
            work = Path(command[command.index("-d") + 1])
            (work / f"pip-{bigbench.FALLBACK_PIP}-py3-none-any.whl").write_bytes(b"wheel")
            return _Done(0)
        assert command[1].endswith(f"pip-{bigbench.FALLBACK_PIP}-py3-none-any.whl/pip")
        (dest / bigbench.SDIST_NAME).write_bytes(b"sdist")
        return _Done(0)

    monkeypatch.setattr(bigbench.fetch, "_run", fake_run)
    monkeypatch.setattr(bigbench.fetch, "_installed_pip_refuses", lambda: False)  # an older pip is tried first
    assert bigbench.download_sdist(dest) == dest / bigbench.SDIST_NAME
    assert len(commands) == 3 and commands[2][2:5] == ["download", "--no-deps", "--no-binary"]
    # pip >= 26.3 installed: straight to the fallback (no 358 MB download thrown away).
    (dest / bigbench.SDIST_NAME).unlink()
    commands.clear()
    monkeypatch.setattr(bigbench.fetch, "_installed_pip_refuses", lambda: True)
    assert bigbench.download_sdist(dest).exists() and len(commands) == 2


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _family_pool(families: int = 30, per_family: int = 4, seed: int = 0) -> list[dict]:
    """Prompts in families sharing a 70-character start (near-duplicates), across categories and tasks."""
    rng = random.Random(seed)
    rows = []
    for f in range(families):
        stem = f"Family {f:03d} " + _words(rng, 12)
        category = CATEGORIES[f % 5]
        for k in range(per_family):
            rows.append(_prompt_row(id=f"fam/{f}/{k}", prompt=f"{stem[:70]} variant {k}: {_words(rng, 3)}", task=f"task{f % 3}", category=category))
    return rows


def test_splits_keep_near_duplicates_together():
    rows = _family_pool()  # 30 families of 4 near-duplicates
    caps = {"sft": 12, "rm": 6, "ppo": 6, "eval": 6}
    result = make_splits(rows, caps, prefix_chars=60, seed=0)
    # Independent check (not the library's grouping): each family's normalised 60-char prefix in one split.
    owner: dict[str, set[str]] = {}
    for name, chosen in result.splits.items():
        for row in chosen:
            assert row["split"] == name
            owner.setdefault(normalise_for_dedup(row["prompt"])[:60], set()).add(name)
    assert all(len(splits) == 1 for splits in owner.values()), owner
    assert sum(len(v) for v in result.splits.values()) == 30 and all(v == 0 for v in result.shortfall.values())
    check_no_leakage(result.splits, 60)


def test_leakage_check_catches_prefix_and_containment():
    a = _prompt_row(id="a", prompt="Passage: The quick brown fox jumps over the lazy dog near the river bank. Who jumps?")
    b = _prompt_row(id="b", prompt="passage the QUICK brown fox -- jumps over the lazy dog near the river bank!!! Who sleeps?")
    with pytest.raises(DataError, match=r"'a' \(sft\) and 'b' \(eval\) are near-duplicates"):
        check_no_leakage({"sft": [a], "eval": [b]}, 60)
    short = _prompt_row(id="s", prompt="What is the capital of France?")
    longer = _prompt_row(id="l", prompt="What is the capital of France? Answer in one word.")
    with pytest.raises(DataError, match="near-duplicates"):
        check_no_leakage({"rm": [short], "ppo": [longer]}, 60)
    with pytest.raises(DataError, match="id 'a' is in both"):
        check_no_leakage({"rm": [a], "ppo": [_prompt_row(id="a", prompt="something else entirely")]}, 60)
    check_no_leakage({"sft": [a, b], "eval": [short]}, 60)  # together in one split is fine
    # Transitive: x~y share a prefix, y~z share another; x and z must stay together.
    groups = near_duplicate_groups(["aaaa bbbb", "aaaa bbbb cccc dddd", "aaaa bbbb cccc eeee"], 12)
    assert len(set(groups)) == 1


def test_splits_are_seeded_and_balanced():
    rows = _family_pool(families=60, per_family=2)
    caps = {"sft": 20, "rm": 10, "ppo": 10, "eval": 20}
    first = make_splits(rows, caps, prefix_chars=60, seed=3).splits
    again = make_splits(rows, caps, prefix_chars=60, seed=3).splits
    other = make_splits(rows, caps, prefix_chars=60, seed=4).splits
    ids = {k: [r["id"] for r in v] for k, v in first.items()}
    assert ids == {k: [r["id"] for r in v] for k, v in again.items()}
    assert ids != {k: [r["id"] for r in v] for k, v in other.items()}
    # Paper shares over the 5 categories present: generation 45.6 of 84.4% -> 11 of 20 eval prompts.
    assert Counter(r["category"] for r in first["eval"]) == {"generation": 11, "open_qa": 3, "brainstorming": 3, "chat": 2, "rewrite": 1}
    assert len({r["task"] for r in first["sft"] if r["category"] == "generation"}) > 1  # tasks taken in turn


def test_shortfall_is_reported_not_hidden():
    rows = _family_pool(families=5, per_family=1)
    result = make_splits(rows, {"sft": 4, "eval": 4}, prefix_chars=60, seed=0)
    assert len(result.splits["eval"]) == 4 and len(result.splits["sft"]) == 1 and result.shortfall["sft"] == 3


def test_validation_split_keeps_groups():
    rows = _family_pool(families=10, per_family=3)
    train, val = validation_split(rows, 0.2, 60, seed=0)
    assert len(val) == 6 and set(train).isdisjoint(val) and len(train) + len(val) == 30
    check_no_leakage({"sft": [rows[i] for i in train], "eval": [rows[i] for i in val]}, 60)


# ---------------------------------------------------------------------------------------------
# Hub adapters on fixture files in each dataset's column layout
# ---------------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_hub_fixtures(root: Path, n_dolly: int = 60) -> dict:
    rng = random.Random(1)
    dolly_categories = list(hub.DOLLY_CATEGORIES)
    dolly = [
        {
            "instruction": f"Instruction {i}: {_words(rng, 8)}?",
            "context": f"Context {i} {_words(rng, 20)}." if i % 3 == 0 else "",
            "response": f"{_words(rng, 12)}.",
            "category": dolly_categories[i % len(dolly_categories)],
        }
        for i in range(n_dolly)
    ]
    hh = [
        {"chosen": f"\n\nHuman: {_words(rng, 6)}?\n\nAssistant: {_words(rng, 4)}\n\nHuman: and {i}?\n\nAssistant: good {i}",
         "rejected": ""}
        for i in range(8)
    ]  # fmt: skip
    for row in hh:
        row["rejected"] = row["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: bad answer"
    hh[0]["rejected"] = "\n\nHuman: a different start\n\nAssistant: bad"
    generation = [
        {"type": "Adversarial", "category": "Misconceptions", "question": f"Q{i} {_words(rng, 5)}?", "best_answer": "Nothing.",
         "correct_answers": ["Nothing.", "No effect."], "incorrect_answers": ["You die."], "source": "https://example.org"}
        for i in range(10)
    ]  # fmt: skip
    multiple_choice = [
        {"question": g["question"], "mc1_targets": {"choices": ["Nothing.", "You die."], "labels": [1, 0]},
         "mc2_targets": {"choices": ["Nothing.", "No effect.", "You die."], "labels": [1, 1, 0]}}
        for g in generation
    ]  # fmt: skip
    rtp = [
        {"filename": f"{i}.txt", "begin": 0, "end": 10, "challenging": i % 2 == 0,
         "prompt": {"text": f"So I told him {_words(rng, 5)}", "toxicity": None if i == 0 else (0.9 if i % 2 else 0.1), "profanity": 0.1},
         "continuation": {"text": _words(rng, 5), "toxicity": 0.2}}
        for i in range(12)
    ]  # fmt: skip
    squad = []
    for p in range(40):
        context = f"Paragraph {p} {_words(rng, 50)}."
        squad.append({"id": f"sq{p}", "title": "T", "context": context, "question": f"What {_words(rng, 3)}?",
                      "answers": {"text": [context.split()[3]] if p % 5 else [], "answer_start": [0] if p % 5 else []}})  # fmt: skip
    return {
        "dolly": _jsonl(root / "databricks-dolly-15k.jsonl", dolly),
        "hh_rlhf": [_jsonl(root / "harmless-base" / "train.jsonl.gz", hh[:5], gz=True), _jsonl(root / "helpful-base" / "train.jsonl.gz", hh[5:], gz=True)],
        "truthful_qa": {"generation": _jsonl(root / "generation.jsonl", generation), "multiple_choice": _jsonl(root / "mc.jsonl", multiple_choice)},
        "real_toxicity_prompts": _jsonl(root / "prompts.jsonl", rtp),
        "squad_v2": _jsonl(root / "squad_v2_validation.jsonl", squad),
    }


def test_hub_adapters_on_fixture_files(tmp_path: Path):
    files = write_hub_fixtures(tmp_path)
    dolly = hub.load_dolly(files["dolly"])
    assert len(dolly.rows) == 60 and {r["category"] for r in dolly.rows} == {
        "generation", "open_qa", "brainstorming", "classification", "closed_qa", "extraction", "summarization"}  # fmt: skip
    with_context = next(r for r in dolly.rows if r["task"] == "dolly/closed_qa" and r["prompt"].startswith("Context"))
    assert with_context["context"] and with_context["prompt"].endswith("?")  # context first, then the instruction
    dolly.dataset(PROMPT_FEATURES, "hub fixture")
    pairs = hub.load_hh_rlhf(files["hh_rlhf"])
    assert Counter(p["subset"] for p in pairs.rows) == {"harmless": 4, "helpful": 3}
    assert pairs.skips == {"hh-rlhf/train.jsonl.gz: dialogues differ before the last assistant turn": 1}
    pair = pairs.rows[0]
    assert pair["prompt"].startswith("Human: ") and pair["prompt"].endswith("?") and pair["chosen"].startswith("good")
    assert pair["rejected"] == "bad answer"
    truthful = hub.load_truthful_qa(files["truthful_qa"])
    assert len(truthful.rows) == 10 and truthful.rows[0]["mc_labels"] == [1, 0]
    toxicity = hub.load_real_toxicity_prompts(files["real_toxicity_prompts"])
    assert Counter(r["kind"] for r in toxicity.rows) == {"rtp_unscored": 1, "rtp_toxic": 6, "rtp_nontoxic": 5}
    squad = hub.load_squad_v2(files["squad_v2"])
    assert len(squad.rows) == 40 and squad.rows[0]["answers"] == [] and squad.rows[1]["answers"]


def test_hub_adapters_fail_clearly(tmp_path: Path, monkeypatch):
    bad = _jsonl(tmp_path / "dolly.jsonl", [{"instruction": "x", "response": "y"}])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['context', 'category'\]"):
        hub.load_dolly(bad)
    bad = _jsonl(tmp_path / "dolly2.jsonl", [{"instruction": "x", "context": "", "response": "y", "category": "open_qa"},
                                             {"instruction": None, "context": "", "response": "y", "category": "open_qa"}])  # fmt: skip
    with pytest.raises(DataError, match=r"databricks-dolly-15k, row 1: field 'instruction'"):
        hub.load_dolly(bad)
    with pytest.raises(DataError, match="do not exist"):
        hub.load_squad_v2(tmp_path / "missing.jsonl")
    # Offline and no fixture: a clear error within seconds (never a fake download).
    monkeypatch.setattr("rlhf_lib.models.hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"hub:databricks/databricks-dolly-15k .*not available here.*data_files="):
        hub.load_dolly()
    assert time.perf_counter() - started < 15


# ---------------------------------------------------------------------------------------------
# StudyData: build, save/load, the cached stage
# ---------------------------------------------------------------------------------------------


def _assert_study(data: StudyData, cfg) -> None:
    counts = Counter(data.prompts["split"])
    assert counts == {"sft": cfg.data.sft_prompts, "rm": cfg.data.rm_prompts, "ppo": cfg.data.ppo_prompts, "eval": cfg.data.eval_prompts}
    check_no_leakage(data.prompts, cfg.data.near_duplicate_prefix_chars)
    assert all(len(r) <= 4 * cfg.data.max_response_tokens for r in data.prompts["reference"])
    assert all(len(p) <= 4 * cfg.data.max_prompt_tokens for p in data.prompts["prompt"])
    assert all(r.strip() for r in data.split("sft")["reference"])
    table = category_mix_table(data)
    assert table["total"].sum() == len(data.prompts) and table.loc["generation", "paper_pct"] == 45.6
    squad_contexts = {normalise_for_dedup(t)[:60] for t in [*data.squad["context"], *data.squad_shots["context"]]}
    pretrain = [normalise_for_dedup(t)[:60] for t in [*data.pretrain["text"], *data.pretrain_heldout["text"]]]
    assert squad_contexts.isdisjoint(pretrain) and len(set(pretrain)) == len(pretrain)
    assert set(data.squad["id"]).isdisjoint(data.squad_shots["id"])


def test_build_from_fixture_tree_and_roundtrip(bb_root: Path, tmp_path: Path):
    cfg = load_preset("micro")
    data = build_study_data(cfg, bigbench_root=bb_root)
    _assert_study(data, cfg)
    assert len(data.truthfulqa) == cfg.data.truthfulqa_questions and len(data.hhh_pairs) == 12
    assert len(data.toxicity) == cfg.data.toxicity_prompts and set(data.toxicity["kind"]) == {"harmful_request", "violence_continuation", "stereotype_question"}
    assert len(data.squad) == cfg.data.squad_questions and len(set(data.squad["subset"])) == 5
    assert data.info["skips"]["bbq_lite_json/age_ambig: non-negative question"] == 2
    again = build_study_data(cfg, bigbench_root=bb_root)
    assert again.prompts["id"] == data.prompts["id"] and again.pretrain["id"] == data.pretrain["id"]
    with pytest.warns(UserWarning, match="fewer rows than the preset asks for"):
        short = build_study_data(load_preset("micro", {"data.toxicity_prompts": 50}), bigbench_root=bb_root)
    assert short.info["set_shortfall"] == {"toxicity": 37} and data.info["set_shortfall"] == {}
    other = build_study_data(load_preset("micro", {"seed": 1}), bigbench_root=bb_root)
    assert other.prompts["id"] != data.prompts["id"]
    saved = data.save(tmp_path / "study")
    loaded = StudyData.load(saved)
    assert loaded.prompts.to_list() == data.prompts.to_list() and loaded.info["seed"] == 0
    assert loaded.summary().loc["all", "total"] == 40 and list(loaded.summary().columns) == [*SPLITS, "total"]


def test_build_from_hub_fixtures(tmp_path: Path):
    cfg = load_preset("micro")
    data = build_study_data(cfg, source="hub", data_files=write_hub_fixtures(tmp_path))
    _assert_study(data, cfg)
    assert set(data.prompts["source"]) == {"hub:databricks/databricks-dolly-15k"}
    assert len(data.hhh_pairs) == 7 and len(data.truthfulqa) == 8
    assert all(a for a in data.squad["answers"])  # unanswerable questions are not few-shot targets


def test_data_stage_is_cached(bb_root: Path, tmp_path: Path):
    cfg = load_preset("micro")
    paths = RunPaths.for_config(cfg, tmp_path / "runs")
    calls = []

    def builder(c):
        calls.append(c)
        return build_study_data(c, bigbench_root=bb_root)

    first = build_data_stage(cfg, paths, builder=builder)
    second = build_data_stage(cfg, paths, builder=builder)
    assert len(calls) == 1 and first.prompts["id"] == second.prompts["id"]
    assert (paths.data / "category_mix.csv").exists() and (paths.data / "study" / "info.json").exists()
    with pytest.raises(DataError, match="produced no prompts within max_prompt_tokens"):
        build_study_data(load_preset("micro", {"data.max_prompt_tokens": 8}), bigbench_root=bb_root)


# ---------------------------------------------------------------------------------------------
# The real BIG-bench 1.0.0 sdist
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_bigbench_micro_study():
    try:
        root = bigbench.ensure_bigbench_tasks()  # downloads 358 MB once into the shared cache
    except DataError as err:  # delisted from PyPI in 2026-12: the test needs a copy or a checkout
        pytest.skip(f"the real BIG-bench cannot be had here ({str(err).splitlines()[0]}); set {bigbench.TASKS_DIR_ENV} to a checkout")
    assert len([p for p in (root / "natural_instructions").iterdir() if p.name.startswith("subtask")]) == 61
    pairs = bigbench.parse_hhh_alignment(root / "hhh_alignment")
    assert Counter(p["subset"] for p in pairs) == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
    cfg = load_preset("micro")
    data = build_study_data(cfg, bigbench_root=root)
    _assert_study(data, cfg)
    assert data.info["available"] == {
        "truthfulqa": 299,
        "preference_pairs": 221,
        "toxicity": {"harmful_request": 25, "violence_continuation": 280, "stereotype_question": 4019},
        "qa": 48201,
        "paragraphs": 9750,
    }
    assert len(data.hhh_pairs) == 221 and len(data.truthfulqa) == 8
    mix = category_mix_table(data)
    assert mix.loc["generation", "total"] == mix["total"].max()  # the paper's largest use case stays largest
    assert (mix["total"] > 0).sum() >= 6
