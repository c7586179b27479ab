"""Getting the BIG-bench 1.0.0 task files: download, sha256 check, stream extraction, cache, checkout fallback.

Also the constants that name the release and the tasks this study reads (TASKS), and the content hashes
(`task_digests`) recorded in the data's provenance when a checkout is used.

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
"""

from __future__ import annotations

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_lib.data.schema import DataError
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
