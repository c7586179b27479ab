"""Everything the study reads, built once per preset: prompt splits, demonstrations, evaluation sets.

    from rlhf_lib.config import load_preset
    from rlhf_lib.pipeline import RunPaths
    from rlhf_lib.data import build_data_stage, category_mix_table

    cfg = load_preset("micro")
    data = build_data_stage(cfg, RunPaths.for_config(cfg))   # cached: a rerun loads from disk
    data.split("sft")                  # demonstrations: prompt + human-written `reference`
    data.split("eval")                 # held-out prompts for the preference evaluation
    data.summary()                     # rows per category x split
    category_mix_table(data)           # our use-case mix beside the paper's Table 1

Sets (each a `datasets.Dataset` in one schema of rlhf_lib.data.schema):
- ``prompts`` (PROMPT_FEATURES): the four disjoint splits, `split` column set; every row carries its
  human reference (the demonstration for SFT rows; the labelers' reference elsewhere).
- ``truthfulqa`` (TRUTHFULQA_FEATURES), ``hhh_pairs`` (PREFERENCE_PAIR_FEATURES, all of them),
  ``toxicity`` (TOXICITY_FEATURES, balanced over `kind`).
- ``squad`` (QA_FEATURES): few-shot QA questions for the alignment tax, balanced over subsets;
  ``squad_shots``: QA rows from other paragraphs to build the few-shot examples from.
- ``pretrain`` / ``pretrain_heldout`` (PRETRAIN_FEATURES): real paragraphs for PPO-ptx and for the
  held-out LM loss; disjoint from each other, from the SQuAD paragraphs above, and from every
  prompt's `context`, so PPO-ptx never trains on text that an evaluation asks about.

Lengths: prompts longer than `data.max_prompt_tokens` are dropped and references are cut to
`data.max_response_tokens` (at a sentence end where possible), with 4 characters per token as the
proxy (rlhf_lib.data.common). Skipped input rows are counted in ``info["skips"]``; a split that
comes out empty is an error, and one that falls short of its cap is reported (a warning, and
``info["shortfall"]`` for the prompt splits, ``info["set_shortfall"]`` for the other capped sets).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset, Features, load_from_disk

from rlhf_lib.config import StudyConfig
from rlhf_lib.data import bigbench, hub
from rlhf_lib.data.common import CHARS_PER_TOKEN, ParseResult, approx_tokens, max_chars, truncate_reference
from rlhf_lib.data.schema import (
    CATEGORIES,
    PAPER_CATEGORY_SHARE,
    PREFERENCE_PAIR_FEATURES,
    PRETRAIN_FEATURES,
    PROMPT_FEATURES,
    QA_FEATURES,
    SPLITS,
    TOXICITY_FEATURES,
    TRUTHFULQA_FEATURES,
    DataError,
    to_dataset,
)
from rlhf_lib.data.splits import check_no_leakage, dedup_key, make_splits
from rlhf_lib.pipeline import RunPaths, cached_stage

SOURCES = ("bigbench", "hub")
SQUAD_SHOTS_PER_SUBSET = 4  # few-shot example pool per SQuAD subset (the evaluation uses 0-4 shots)
MIN_PRETRAIN_CHARS = 200  # shorter paragraphs are fragments, not prose
HUB_MAX_PAIRS = 2000  # hh-rlhf has ~160k pairs; the RM-generalisation check needs a sample

_FEATURES: dict[str, Features] = {
    "prompts": PROMPT_FEATURES,
    "truthfulqa": TRUTHFULQA_FEATURES,
    "hhh_pairs": PREFERENCE_PAIR_FEATURES,
    "squad": QA_FEATURES,
    "squad_shots": QA_FEATURES,
    "pretrain": PRETRAIN_FEATURES,
    "pretrain_heldout": PRETRAIN_FEATURES,
    "toxicity": TOXICITY_FEATURES,
}
INFO_FILE = "info.json"


@dataclass
class StudyData:
    """The datasets of one preset's study (see the module docstring for each set)."""

    prompts: Dataset
    truthfulqa: Dataset
    hhh_pairs: Dataset
    squad: Dataset
    squad_shots: Dataset
    pretrain: Dataset
    pretrain_heldout: Dataset
    toxicity: Dataset
    info: dict[str, Any] = field(default_factory=dict)

    def sets(self) -> dict[str, Dataset]:
        return {name: getattr(self, name) for name in _FEATURES}

    def split(self, name: str) -> Dataset:
        """The prompts of one split (sft rows are the demonstrations)."""
        if name not in SPLITS:
            raise KeyError(f"Unknown split '{name}'; splits are {SPLITS}.")
        indices = [i for i, s in enumerate(self.prompts["split"]) if s == name]
        return self.prompts.select(indices)

    @property
    def demonstrations(self) -> Dataset:
        return self.split("sft")

    # ---- persistence -----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write every set (datasets' arrow format) and info.json; atomically (temp dir, then rename)."""
        import datasets

        from rlhf_lib.models import atomic_directory

        final = Path(directory)
        was_enabled = datasets.is_progress_bar_enabled()
        if was_enabled:
            datasets.disable_progress_bars()  # eight "Saving the dataset" bars say nothing useful
        try:
            with atomic_directory(final) as tmp:
                for name, dataset in self.sets().items():
                    dataset.save_to_disk(str(tmp / name))
                (tmp / INFO_FILE).write_text(json.dumps(self.info, indent=1, sort_keys=True, default=str))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        return final

    @classmethod
    def load(cls, directory: str | Path) -> StudyData:
        """Read what `save` wrote, checking every set against the current schema."""
        directory = Path(directory)
        if not (directory / INFO_FILE).exists():
            raise DataError(f"{directory}: no {INFO_FILE}; not a saved StudyData (rebuild the data stage).")
        loaded: dict[str, Any] = {"info": json.loads((directory / INFO_FILE).read_text())}
        for name, features in _FEATURES.items():
            try:
                dataset = load_from_disk(str(directory / name))
            except FileNotFoundError as err:
                raise DataError(f"{directory / name}: missing; delete {directory} and rebuild the data stage.") from err
            if dataset.features != features:
                raise DataError(f"{directory / name}: saved with another schema; delete {directory} and rebuild.")
            loaded[name] = dataset
        return cls(**loaded)

    # ---- views for the notebook --------------------------------------------------------------

    def summary(self) -> pd.DataFrame:
        """Prompt counts per use-case category (rows) and split (columns), with totals."""
        frame = pd.DataFrame({"category": self.prompts["category"], "split": self.prompts["split"]})
        table = pd.crosstab(frame["category"], frame["split"]).reindex(index=list(CATEGORIES), columns=list(SPLITS))
        table = table.fillna(0).astype(int)
        table["total"] = table.sum(axis=1)
        table.loc["all"] = table.sum(axis=0)
        return table

    def set_sizes(self) -> pd.DataFrame:
        """Rows in every set, and what it is for."""
        purpose = {
            "prompts": "SFT demonstrations + RM / PPO / eval prompts",
            "truthfulqa": "truthfulness: generation and multiple choice",
            "hhh_pairs": "RM generalisation to real human preferences",
            "squad": "alignment tax: few-shot QA questions",
            "squad_shots": "alignment tax: few-shot examples",
            "pretrain": "PPO-ptx pretraining text",
            "pretrain_heldout": "alignment tax: held-out LM loss",
            "toxicity": "toxicity probes",
        }
        return pd.DataFrame(
            [{"set": name, "rows": len(ds), "purpose": purpose[name]} for name, ds in self.sets().items()]
        ).set_index("set")

    def category_mix(self, split: str | None = None) -> pd.Series:
        """Share (%) of each use-case category among the prompts (of one split, or all)."""
        categories = self.prompts["category"] if split is None else self.split(split)["category"]
        counts = Counter(categories)
        total = max(1, sum(counts.values()))
        return pd.Series({c: 100.0 * counts.get(c, 0) / total for c in CATEGORIES}, name=split or "all")

    def lengths(self) -> pd.DataFrame:
        """One row per prompt: split, category, prompt and reference length in approximate tokens."""
        return pd.DataFrame(
            {
                "split": self.prompts["split"],
                "category": self.prompts["category"],
                "prompt_tokens": [approx_tokens(p) for p in self.prompts["prompt"]],
                "reference_tokens": [approx_tokens(r) for r in self.prompts["reference"]],
            }
        )

    def examples(self, set_name: str, n: int = 3, split: str | None = None, width: int = 300) -> pd.DataFrame:
        """A few rows of a set for display, long strings shortened to `width` characters."""
        dataset = self.split(split) if split else getattr(self, set_name)
        rows = dataset.select(range(min(n, len(dataset)))).to_list()

        def short(value: Any) -> Any:
            if isinstance(value, str) and len(value) > width:
                return value[:width] + " ..."
            if isinstance(value, list):
                return [short(v) for v in value[:6]]
            return value

        return pd.DataFrame([{k: short(v) for k, v in row.items()} for row in rows])


def category_mix_table(data: StudyData) -> pd.DataFrame:
    """Counts per split and our share (%) of each use case beside the paper's Table 1 share (%)."""
    table = data.summary().drop(index="all")
    total = max(1, int(table["total"].sum()))
    table["ours_pct"] = (100.0 * table["total"] / total).round(1)
    table["paper_pct"] = pd.Series(PAPER_CATEGORY_SHARE)
    return table


def plot_lengths(data: StudyData) -> Any:
    """Histograms of prompt and reference lengths (approximate tokens) per split. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = data.lengths()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, column in zip(axes, ("prompt_tokens", "reference_tokens"), strict=True):
        sns.histplot(data=frame, x=column, hue="split", multiple="stack", bins=20, ax=ax)
        ax.set_xlabel(f"{column.replace('_', ' ')} (~{CHARS_PER_TOKEN:g} characters each)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


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


def build_study_data(
    cfg: StudyConfig,
    source: str = "bigbench",
    *,
    data_files: Mapping[str, Any] | None = None,
    bigbench_root: str | Path | None = None,
) -> StudyData:
    """Build every set for `cfg` from the offline BIG-bench sdist ("bigbench") or the Hub ("hub").

    `data_files` (hub only): local files per adapter, keys dolly, hh_rlhf, truthful_qa
    ({"generation", "multiple_choice"}), real_toxicity_prompts, squad_v2. `bigbench_root`: an
    already-extracted benchmark_tasks directory (tests); by default it is ensured in the cache.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    raw = _bigbench_sources(cfg, bigbench_root) if source == "bigbench" else _hub_sources(cfg, data_files)
    d = cfg.data
    prompts, shortfall = _split_prompts(raw["pool"], cfg)
    qa = _qa_and_pretrain(raw["qa"], raw["paragraphs"], prompts, cfg)
    truthful = _sample_in_order(raw["truthfulqa"], d.truthfulqa_questions, _rng(cfg.seed, "truthfulqa"))
    toxicity = _balanced_sample(raw["toxicity"], "kind", d.toxicity_prompts, _rng(cfg.seed, "toxicity"))
    label = "bigbench-1.0.0" if source == "bigbench" else "hub"
    built: dict[str, Dataset] = {
        "prompts": to_dataset(prompts, PROMPT_FEATURES, f"{label} prompts"),
        "truthfulqa": to_dataset(truthful, TRUTHFULQA_FEATURES, f"{label} truthfulqa"),
        "hhh_pairs": to_dataset(raw["pairs"], PREFERENCE_PAIR_FEATURES, f"{label} preference pairs"),
        "toxicity": to_dataset(toxicity, TOXICITY_FEATURES, f"{label} toxicity"),
    }
    for name in ("squad", "squad_shots", "pretrain", "pretrain_heldout"):
        built[name] = to_dataset(qa[name], _FEATURES[name], f"{label} {name}")
    requested = {"truthfulqa": d.truthfulqa_questions, "toxicity": d.toxicity_prompts, "squad": d.squad_questions, "pretrain": d.pretrain_docs}
    set_shortfall = {name: n - len(built[name]) for name, n in requested.items() if n > len(built[name])}
    if set_shortfall:
        warnings.warn(f"data: fewer rows than the preset asks for (missing per set): {set_shortfall}.", stacklevel=2)
    skips = dict(sorted(raw["pool"].skips.items()))
    if skips:
        print(f"data: skipped {sum(skips.values())} input rows ({len(skips)} task/reason pairs; see info['skips']).")
    info = {
        "source": source,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "chars_per_token": CHARS_PER_TOKEN,
        "caps": {"sft": d.sft_prompts, "rm": d.rm_prompts, "ppo": d.ppo_prompts, "eval": d.eval_prompts},
        "shortfall": shortfall,
        "set_shortfall": set_shortfall,
        "skips": skips,
        "available": {
            "truthfulqa": len(raw["truthfulqa"]),
            "preference_pairs": len(raw["pairs"]),
            "toxicity": dict(Counter(r["kind"] for r in raw["toxicity"])),
            "qa": len(raw["qa"]),
            "paragraphs": len(raw["paragraphs"]),
        },
        "provenance": raw["provenance"],
    }
    return StudyData(**built, info=info)


def build_data_stage(cfg: StudyConfig, paths: RunPaths, builder: Callable[[StudyConfig], StudyData] | None = None) -> StudyData:
    """The data stage: build once per config fingerprint into `paths.data`, then load from disk.

    Also writes summary.csv, category_mix.csv and set_sizes.csv beside the data for the results.
    `builder` replaces `build_study_data` (tests).
    """
    with cached_stage(paths, "data") as stage:
        if not stage.done:
            data = (builder or build_study_data)(cfg)
            data.save(stage.dir / "study")
            data.summary().to_csv(stage.dir / "summary.csv")
            category_mix_table(data).to_csv(stage.dir / "category_mix.csv")
            data.set_sizes().to_csv(stage.dir / "set_sizes.csv")
    return StudyData.load(paths.stage("data") / "study")


def run_data_stage(cfg: StudyConfig, paths: RunPaths, progress: bool = True) -> Path:
    """The data stage called as every stage's runner is (rlhf_lib.pipeline.STAGE_TABLE); it draws no progress bars."""
    build_data_stage(cfg, paths)
    return paths.stage("data")


__all__ = [
    "StudyData",
    "build_data_stage",
    "build_study_data",
    "category_mix_table",
    "plot_lengths",
    "run_data_stage",
]
