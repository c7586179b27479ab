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
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset, Features, load_from_disk

from rlhf_lib.config import StudyConfig
from rlhf_lib.data.build import (
    _balanced_sample,
    _bigbench_sources,
    _hub_sources,
    _qa_and_pretrain,
    _rng,
    _sample_in_order,
    _split_prompts,
)
from rlhf_lib.data.common import CHARS_PER_TOKEN, approx_tokens
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
from rlhf_lib.pipeline import RunPaths, cached_stage

SOURCES = ("bigbench", "hub")

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
