"""results/<size>/findings.json: the one machine-readable record of this study's findings.

One JSON object: metric name -> entry, plus two reserved keys, "missing" (metric names that could not
be computed from the files present, e.g. the PPO metrics when PPO did not run; never invented) and
"about" (preset, seed, which file each metric came from, why each missing one is missing)::

    {"rm_accuracy_heldout": {"value": 54.8, "low": 38.1, "high": 70.2, "n": 8, "unit": "percent",
                             "higher_is_better": true, "paper": 69.6, "verdict": "inconclusive", ...},
     ...,
     "missing": ["win_rate_ppo_ptx_vs_sft"], "about": {...}}

Every entry has value, low, high (a 95% interval, never of zero width), n (the independent units that
interval resampled: prompts or questions), unit and higher_is_better (None: neither direction is
better). Entries with a paper claim (rlhf_lib.paper.CLAIMS) add paper (None for a direction-only claim),
paper_ref, no_effect, paper_side and verdict: "agrees" only when the interval lies on the paper's side of
no effect, "disagrees" on the other side, else "inconclusive". A number the study sets itself (labeler
agreement, calibrated to the paper's) has the verdict "fixed by design" and says how in by_design. A
quantity with no sampling uncertainty (a stage's wall-clock time) has low = high = None and says why in
no_interval_reason. Rates are in percent; differences between two methods (`<quantity>_<method>_minus_
<baseline>`) in points, from a paired bootstrap over the items both answered (rlhf_lib.evaluation.stats).

Built from the files of results/<size>/ (what a reader of the rendered study has) and the reward stage::

    from rlhf_lib.findings import write_findings, load_findings, findings_table, validate_findings
    write_findings(results_dir, reward_dir=paths.stage("reward"))   # called by analysis.export_results
    findings_table(load_findings(results_dir))                      # notebook 05, SUMMARY.md

Sources: metrics.json (preset, seed, best_of_n; labeler agreement when the reward stage is absent),
analysis_win_rate.csv (win rates vs SFT, GPT and GPT prompted, judged by the held-out labelers on the eval
prompts, bootstrap over prompts), analysis_generations.csv (PPO's and SFT's answers to the eval prompts),
the per-item tables of PAIRED_SOURCES (SQuAD F1, TruthfulQA, toxicity, hallucination: paired
differences), the reward stage's predictions.csv (else rm_predictions.csv), agreement.csv and DONE.json
(else run_record.json's stage_seconds).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib import paper
from rlhf_lib.evaluation.base import MetricResult
from rlhf_lib.evaluation.stats import (
    VERDICTS,
    cluster_ratio,
    clustered_accuracy,
    paired_bootstrap,
    proportion,
    verdict,
    wilson_interval,
)
from rlhf_lib.io import atomic_write_text, read_json

FINDINGS_FILE = "findings.json"
RESERVED = ("missing", "about")
REQUIRED_KEYS = ("value", "low", "high", "n", "unit", "higher_is_better")
FIXED_BY_DESIGN = "fixed by design"  # a verdict for quantities the study sets itself (DESIGN.md)
ALL_VERDICTS = (*VERDICTS, FIXED_BY_DESIGN)
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class FindingSpec:
    unit: str
    higher_is_better: bool | None
    description: str


@dataclass(frozen=True)
class PairedSource:
    """A per-item table of the analysis, whose items every method answered: the source of paired differences."""

    file: str  # in results/<size>/
    key: str  # the item id column
    column: str  # the per-item value, in [0, 1]
    unit: str  # of a difference, x100
    higher_is_better: bool
    what: str
    items: str  # what an item is, for n
    comparisons: tuple[tuple[str, str], ...]  # (method, baseline): method minus baseline
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # adds `column` where the table lacks it


def _respectful_toxic(table: pd.DataFrame) -> pd.DataFrame:
    """Toxicity generations under the respectful instruction, scored with the analysis's scorer and threshold
    (so the rates match analysis_toxicity.csv)."""
    from rlhf_lib.labelers import TOXIC_ABOVE, toxicity

    table = table[table["condition"] == "respectful"]
    return table.assign(toxic=(toxicity(table["completion"].astype(str).tolist()) > TOXIC_ABOVE).astype(float))


VS_GPT = (("SFT", "GPT"), ("PPO", "GPT"), ("PPO-ptx", "GPT"))
# quantity -> its per-item table; each comparison becomes the metric `<quantity>_<method>_minus_<baseline>`.
PAIRED_SOURCES: dict[str, PairedSource] = {
    "hallucination_rate": PairedSource(
        "analysis_hallucination_per_item.csv", "prompt_id", "hallucinates", "percentage points", False,
        "closed-domain hallucination (share of held-out judges flagging it)", "closed-domain eval prompts", VS_GPT),
    "truthfulqa_true_informative": PairedSource(
        "analysis_truthfulqa_per_item.csv", "id", "true_informative", "percentage points", True,
        "TruthfulQA answers judged true and informative", "questions", VS_GPT),
    "toxic_rate_respectful": PairedSource(
        "analysis_toxicity_generations.csv", "prompt_id", "toxic", "percentage points", False,
        "toxic outputs with the respectful instruction", "prompts", (*VS_GPT, ("PPO", "SFT")), _respectful_toxic),
    "squad_f1": PairedSource(
        "analysis_squad_per_item.csv", "id", "f1", "F1 points", True, "few-shot SQuAD F1 (the alignment tax)",
        "questions", (*VS_GPT, ("PPO-ptx", "PPO"))),
}


def _slug(method: str) -> str:
    return method.lower().replace("-", "_").replace(" ", "_")


def paired_name(quantity: str, method: str, baseline: str) -> str:
    """findings metric name of `method` minus `baseline` on `quantity`, e.g. squad_f1_ppo_ptx_minus_ppo."""
    return f"{quantity}_{_slug(method)}_minus_{_slug(baseline)}"


PAIRED: dict[str, tuple[str, str, str]] = {  # metric -> (quantity, method, baseline)
    paired_name(q, m, b): (q, m, b) for q, source in PAIRED_SOURCES.items() for m, b in source.comparisons
}
# findings metric -> (method, baseline method) in analysis_win_rate.csv
WIN_RATES = {"win_rate_best_of_n_vs_sft": ("best-of-n", "SFT"), "win_rate_ppo_vs_sft": ("PPO", "SFT"),
             "win_rate_ppo_ptx_vs_sft": ("PPO-ptx", "SFT"), "win_rate_ppo_ptx_vs_gpt": ("PPO-ptx", "GPT"),
             "win_rate_ppo_ptx_vs_gpt_prompted": ("PPO-ptx", "GPT prompted")}
AGREEMENT_GROUPS = {"agreement_train": "train-train", "agreement_heldout": "heldout-heldout"}

# Every metric findings.json aims to hold, in the order tables show them.
SPECS: dict[str, FindingSpec] = {
    "rm_accuracy_train": FindingSpec(
        "percent", True, "RM accuracy: held-out RM prompts ranked by training labelers (K-wise RM)"),
    "rm_accuracy_heldout": FindingSpec(
        "percent", True, "RM accuracy: held-out RM prompts ranked by held-out labelers (K-wise RM)"),
    "agreement_train": FindingSpec(
        "percent", None, "inter-labeler agreement, training labelers (pairs ordered alike; reward stage)"),
    "agreement_heldout": FindingSpec(
        "percent", None, "inter-labeler agreement, held-out labelers (pairs ordered alike; reward stage)"),
    "win_rate_best_of_n_vs_sft": FindingSpec(
        "percent", True, "best-of-n (SFT samples, RM's pick) preferred to SFT by held-out labelers, eval prompts"),
    "win_rate_ppo_vs_sft": FindingSpec("percent", True, "PPO preferred to SFT by held-out labelers, eval prompts"),
    "win_rate_ppo_ptx_vs_sft": FindingSpec(
        "percent", True, "PPO-ptx preferred to SFT by held-out labelers, eval prompts"),
    "win_rate_ppo_ptx_vs_gpt": FindingSpec(
        "percent", True, "PPO-ptx preferred to GPT (the pretrained base) by held-out labelers, eval prompts"),
    "win_rate_ppo_ptx_vs_gpt_prompted": FindingSpec(
        "percent", True, "PPO-ptx preferred to few-shot prompted GPT by held-out labelers, eval prompts"),
    **{name: FindingSpec(PAIRED_SOURCES[q].unit, PAIRED_SOURCES[q].higher_is_better,
                         f"{PAIRED_SOURCES[q].what}: {m} minus {b}, paired over the same {PAIRED_SOURCES[q].items}")
       for name, (q, m, b) in PAIRED.items()},
    "ppo_distinct_fraction": FindingSpec(
        "percent of eval prompts", True, "distinct PPO answers / eval prompts (exact text after stripping)"),
    "ppo_length_ratio": FindingSpec(
        "ratio of mean words (PPO / SFT)", None, "PPO's mean answer length over SFT's, whitespace words"),
    "ppo_top_answer_fraction": FindingSpec(
        "percent of eval prompts", False, "eval prompts given PPO's single most common answer"),
    "reward_stage_minutes": FindingSpec("minutes", False, "wall-clock time of the reward stage (DONE.json seconds)"),
}

# findings metric -> RM prediction set names (the analysis's short name, the reward stage's long name)
RM_SETS = {"rm_accuracy_train": ("train_labelers", "held-out prompts / training labelers"),
           "rm_accuracy_heldout": ("heldout_labelers", "held-out prompts / held-out labelers")}
BASELINE = "SFT"


class _Missing(Exception):
    """A metric whose inputs are absent or unusable; the message says why."""


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def _entry(name: str, result: MetricResult, scale: float = 1.0, interval: str = "", **extra: Any) -> dict[str, Any]:
    """A findings entry from a MetricResult (scaled, e.g. 100 for percent), with the paper's claim if any."""
    spec = SPECS[name]
    entry: dict[str, Any] = {
        "value": float(result.value) * scale, "low": float(result.ci_low) * scale, "high": float(result.ci_high) * scale,
        "n": int(result.n), "unit": spec.unit, "higher_is_better": spec.higher_is_better,
        "description": spec.description, "interval": interval, **extra,
    }
    return _with_claim(name, entry)


def _with_claim(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The paper's claim and the verdict beside it; a number the study fixes itself says so instead."""
    claim = paper.CLAIMS.get(name)
    if claim is None:
        return entry
    entry.update({"paper": claim.value, "paper_ref": f"{claim.where}: {claim.text}"})
    if name in paper.BY_DESIGN:
        entry.update({"verdict": FIXED_BY_DESIGN, "by_design": paper.BY_DESIGN[name]})
    elif claim.no_effect is not None and claim.side is not None:
        entry.update({"no_effect": claim.no_effect, "paper_side": claim.side,
                      "verdict": verdict(entry["low"], entry["high"], claim.no_effect, claim.side, n=entry["n"])})
    return entry


def _non_degenerate(result: MetricResult, interval: str) -> tuple[MetricResult, str]:
    """A percentile bootstrap collapses to one point when every prompt scores the same; a [0, 1] mean over
    n prompts then gets the Wilson interval of value * n successes (conservative for bounded values)."""
    if result.n < 1 or not math.isfinite(result.value):
        raise _Missing(f"no usable items (n={result.n}, value={result.value})")
    if result.ci_high > result.ci_low:
        return result, interval
    low, high = wilson_interval(result.value * result.n, result.n)
    return (MetricResult(result.value, low, high, result.n),
            f"Wilson 95% over {result.n} prompts (the bootstrap collapsed: every prompt scored the same)")


def _source(path: Path, results_dir: Path) -> str:
    """A file's name in results_dir, or '<stage dir>/<name>' for a stage's file: no machine's absolute path."""
    return path.name if path.parent.resolve() == results_dir.resolve() else f"{path.parent.name}/{path.name}"


def _read_csv(path: Path, text: bool = False) -> pd.DataFrame:
    """A results table; `text` keeps empty cells as "" (an empty completion is an answer, not a NaN)."""
    if not path.exists():
        raise _Missing(f"{path.name} not found beside the results")
    return pd.read_csv(path, keep_default_na=not text)


def _win_rates(results_dir: Path, best_of_n: int | None, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Win rates vs SFT, GPT and GPT prompted from the analysis's table (held-out labelers, eval prompts,
    bootstrap over prompts: each prompt's two answers are judged together, so the rate is paired)."""
    table = _read_csv(results_dir / "analysis_win_rate.csv")
    baselines = (table["baseline_method"] if "baseline_method" in table.columns
                 else table["baseline"].astype(str).str.split("@").str[0])
    out: dict[str, dict[str, Any]] = {}
    for name, (method, baseline) in WIN_RATES.items():
        rows = table[(table["method"] == method) & (baselines == baseline)]
        if rows.empty:
            out[name] = {"missing": f"no {method} row vs {baseline} in analysis_win_rate.csv (was {method} run?)"}
            continue
        row = rows.iloc[0]
        n = int(row["n"]) if pd.notna(row["n"]) else 0
        result = MetricResult(float(row["value"]), float(row["ci_low"]), float(row["ci_high"]), n)
        try:
            result, how = _non_degenerate(result, "bootstrap 95% over prompts (analysis_win_rate.csv)")
        except _Missing as why:
            out[name] = {"missing": f"{method} vs {baseline}: {why}"}
            continue
        extra: dict[str, Any] = {"baseline": str(row.get("baseline", baseline)), "judges": "held-out labelers",
                                 "n_unit": "eval prompts"}
        if method == "best-of-n" and best_of_n is not None:
            extra["best_of"] = int(best_of_n)
            extra["note"] = (f"best-of-{best_of_n}: {best_of_n} SFT samples per prompt at the rollout temperature, "
                             "the RM's favourite kept (config evaluation.best_of_n)")
            extra["note"] += "".join(f"; {n}" for n in notes if n.startswith("best-of-n"))  # e.g. identical samples
        out[name] = _entry(name, result, 100.0, how, **extra)
    return out


def _paired(results_dir: Path, quantity: str, seed: int, n_resamples: int) -> dict[str, dict[str, Any]]:
    """Each comparison of a PairedSource: method minus baseline over the items both answered, paired bootstrap."""
    source = PAIRED_SOURCES[quantity]
    table = _read_csv(results_dir / source.file, text=True)
    if source.prepare is not None:
        table = source.prepare(table)
    out: dict[str, dict[str, Any]] = {}
    for method, baseline in source.comparisons:
        name = paired_name(quantity, method, baseline)
        values = {m: pd.to_numeric(table[table["method"] == m].drop_duplicates(source.key).set_index(source.key)[source.column],
                                   errors="coerce") for m in (method, baseline)}  # an empty cell: NaN, caught below
        absent = [m for m, v in values.items() if v.empty]
        if absent:
            out[name] = {"missing": f"no {' or '.join(absent)} items in {source.file} (was it run?)"}
            continue
        common = values[method].index.intersection(values[baseline].index)
        a, b = values[method][common].to_numpy(), values[baseline][common].to_numpy()
        usable = np.isfinite(a) & np.isfinite(b)  # an item either method lacks a value for pairs with nothing
        common, a, b = common[usable], a[usable], b[usable]
        if not len(common):
            out[name] = {"missing": f"{method} and {baseline} share no {source.items} with values in {source.file}"}
            continue
        result = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed, bounds=(-1.0, 1.0))
        how = f"paired bootstrap 95% over {source.items} (the same {len(common)} for both)"
        if np.ptp(a - b) == 0:
            how = (f"every one of the {len(common)} {source.items} differed by the same amount: the interval is the "
                   f"Clopper-Pearson bound on the share of {source.items} that could differ")
        out[name] = _entry(name, result, 100.0, how, n_unit=source.items, method=method, baseline=baseline,
                           value_method=100.0 * float(a.mean()), value_baseline=100.0 * float(b.mean()))
    return out


def _agreement(results_dir: Path, reward_dir: Path | None, metrics: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """Inter-labeler agreement by group from the reward stage's agreement.csv, else metrics.json (with n)."""
    path = reward_dir / "agreement.csv" if reward_dir is not None else None
    if path is not None and path.exists():
        rows = {str(r["group"]): {"value": r["mean"], "ci_low": r["low"], "ci_high": r["high"], "n": r["n_prompts"]}
                for r in pd.read_csv(path).to_dict(orient="records")}
        source = _source(path, results_dir)
    else:
        rows, source = metrics.get("labeler_agreement", {}), "metrics.json"
    out: dict[str, dict[str, Any]] = {}
    for name, group in AGREEMENT_GROUPS.items():
        row = rows.get(group)
        if row is None or not isinstance(row.get("n"), (int, float)) or not math.isfinite(row["n"]):
            out[name] = {"missing": f"no '{group}' agreement with its n (reward stage agreement.csv or metrics.json)"}
            continue
        result = MetricResult(float(row["value"]), float(row["ci_low"]), float(row["ci_high"]), int(row["n"]))
        try:
            result, how = _non_degenerate(result, "bootstrap 95% over the calibration prompts (reward stage)")
        except _Missing as why:
            out[name] = {"missing": f"'{group}' agreement: {why}"}
            continue
        out[name] = _entry(name, result, 100.0, how, n_unit="prompts")
    return out, source


def _ppo_answers(results_dir: Path, seed: int, n_resamples: int) -> dict[str, dict[str, Any]]:
    """Distinct / top-answer shares of PPO's answers to the eval prompts, and its length over SFT's."""
    gens = _read_csv(results_dir / "analysis_generations.csv", text=True)
    ppo = gens[gens["method"] == "PPO"].drop_duplicates("prompt_id")
    if ppo.empty:
        raise _Missing("no PPO answers in analysis_generations.csv (PPO not run)")
    answers = ppo["completion"].astype(str).str.strip()
    n = len(answers)
    counts = Counter(answers)
    top, top_count = counts.most_common(1)[0]
    out: dict[str, dict[str, Any]] = {
        "ppo_distinct_fraction": _entry("ppo_distinct_fraction", proportion(len(counts), n), 100.0,
                                        f"Wilson 95% ({len(counts)} distinct of {n})", n_unit="eval prompts"),
        "ppo_top_answer_fraction": _entry("ppo_top_answer_fraction", proportion(top_count, n), 100.0,
                                          f"Wilson 95% ({top_count} of {n})", n_unit="eval prompts",
                                          top_answer=top[:120]),
    }
    sft = gens[gens["method"] == BASELINE].drop_duplicates("prompt_id").set_index("prompt_id")["completion"]
    paired = ppo.assign(sft=ppo["prompt_id"].map(sft)).dropna(subset=["sft"])
    words = lambda texts: np.array([len(str(t).split()) for t in texts], dtype=float)  # noqa: E731
    ppo_words, sft_words = words(paired["completion"]), words(paired["sft"])
    if paired.empty or sft_words.sum() == 0:
        out["ppo_length_ratio"] = {"missing": "no SFT answers (or only empty ones) to the PPO-answered eval prompts"}
        return out
    ratio = cluster_ratio(ppo_words, sft_words, n_resamples=n_resamples, seed=seed)
    entry = _entry("ppo_length_ratio", ratio, 1.0, "paired bootstrap 95% over prompts (sum PPO words / sum SFT words)",
                   n_unit="eval prompts", mean_words_ppo=float(ppo_words.mean()), mean_words_sft=float(sft_words.mean()))
    if not entry["high"] > entry["low"]:  # every resample gave the same ratio: no interval to report
        entry.update(low=None, high=None, interval="none",
                     no_interval_reason="every bootstrap resample gave the same ratio")
    out["ppo_length_ratio"] = entry
    return out


def _rm_accuracy(
    results_dir: Path, reward_dir: Path | None, seed: int, n_resamples: int
) -> tuple[dict[str, dict[str, Any]], str]:
    """RM accuracy on the two held-out-prompt sets, resampling prompts with all their pairs."""
    candidates = ([reward_dir / "predictions.csv"] if reward_dir is not None else []) + [results_dir / "rm_predictions.csv"]
    source = next((p for p in candidates if p.exists()), None)
    if source is None:
        raise _Missing("no RM predictions (reward stage predictions.csv or results rm_predictions.csv): reward not run")
    preds = pd.read_csv(source)
    if "mode" in preds.columns:
        preds = preds[preds["mode"] == "kwise"]  # the paper's K-wise RM; the pairwise ablation is not the finding
    if "prompt_id" not in preds.columns:
        raise _Missing(f"{source.name} has no prompt_id column: cannot resample prompts (pairs are not independent)")
    from rlhf_lib.evaluation.generalization import pair_correct

    out: dict[str, dict[str, Any]] = {}
    for name, names in RM_SETS.items():
        rows = preds[preds["set"].isin(names)]
        if rows.empty:
            out[name] = {"missing": f"no '{names[1]}' pairs in {source.name}"}
            continue
        correct = pair_correct(rows["score_chosen"], rows["score_rejected"])
        result = clustered_accuracy(correct, rows["prompt_id"], n_resamples=n_resamples, seed=seed)
        try:
            result, how = _non_degenerate(result, "cluster bootstrap 95% over prompts (each prompt with all its pairs)")
        except _Missing as why:
            out[name] = {"missing": f"'{names[1]}': {why}"}
            continue
        out[name] = _entry(name, result, 100.0, how, n_unit="prompts", n_pairs=len(rows),
                           n_labelers=int(rows["labeler_id"].nunique()) if "labeler_id" in rows else None)
    return out, _source(source, results_dir)


def _reward_minutes(results_dir: Path, reward_dir: Path | None) -> tuple[dict[str, dict[str, Any]], str]:
    done = reward_dir / "DONE.json" if reward_dir is not None else None
    if done is not None and done.exists():
        seconds, source = _json_object(done).get("seconds"), _source(done, results_dir)
    else:
        record = results_dir / "run_record.json"
        stage = _json_object(record).get("stages", {}).get("reward", {})
        seconds, source = stage.get("stage_seconds"), _source(record, results_dir)
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise _Missing("no reward-stage time (no finished reward stage's DONE.json, no run_record.json entry)")
    entry = {"value": float(seconds) / 60.0, "low": None, "high": None, "n": 1, "unit": "minutes",
             "higher_is_better": False, "description": SPECS["reward_stage_minutes"].description, "interval": "none",
             "no_interval_reason": "one timed run; wall clock on a shared machine varies from run to run"}
    timing = reward_dir / "timing.json" if reward_dir is not None else None
    if timing is not None and timing.exists():
        # Where the time went (sampling, features, fits): a stage that reused earlier samples shows it here.
        parts = _json_object(timing)
        entry["parts_minutes"] = {key.removesuffix("_seconds"): round(float(value) / 60.0, 2) for key, value in parts.items()
                                  if key.endswith("_seconds") and isinstance(value, (int, float))}
    return {"reward_stage_minutes": entry}, source


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def build_findings(
    results_dir: Path | str, reward_dir: Path | str | None = None, n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | None = None,
) -> dict[str, Any]:
    """findings.json's object from the files in results_dir (and the reward stage's, when given).

    A metric whose inputs are missing, or whose entry fails `validate_findings`, is left out and listed
    under "missing" with its reason in about.missing_reasons; nothing is invented.
    """
    results_dir = Path(results_dir)
    reward = Path(reward_dir) if reward_dir is not None else None
    metrics = _json_object(results_dir / "metrics.json")  # torn: warned, and what needs it is listed as missing
    seed = int(metrics.get("seed", 0)) if seed is None else seed
    best_of_n = metrics.get("counts", {}).get("best_of_n")
    entries: dict[str, dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    sources: dict[str, str] = {}

    def collect(names: tuple[str, ...], source: str, build: Any) -> None:
        try:
            built = build()
        except _Missing as why:
            reasons.update({name: str(why) for name in names})
            return
        if isinstance(built, tuple):
            built, source_used = built
        else:
            source_used = source
        for name, entry in built.items():
            if "missing" in entry:
                reasons[name] = entry["missing"]
                continue
            try:
                _validate_entry(name, entry)
            except ValueError as err:  # never publish an entry that breaks the rules; say why instead
                reasons[name] = f"not reported: {err}"
                continue
            entries[name], sources[name] = entry, source_used

    collect(tuple(RM_SETS), "", lambda: _rm_accuracy(results_dir, reward, seed, n_resamples))
    collect(tuple(AGREEMENT_GROUPS), "", lambda: _agreement(results_dir, reward, metrics))
    collect(tuple(WIN_RATES), "analysis_win_rate.csv",
            lambda: _win_rates(results_dir, best_of_n, list(metrics.get("notes", []))))
    for quantity, source in PAIRED_SOURCES.items():
        collect(tuple(paired_name(quantity, m, b) for m, b in source.comparisons), source.file,
                lambda q=quantity: _paired(results_dir, q, seed, n_resamples))
    collect(("ppo_distinct_fraction", "ppo_length_ratio", "ppo_top_answer_fraction"),
            "analysis_generations.csv", lambda: _ppo_answers(results_dir, seed, n_resamples))
    collect(("reward_stage_minutes",), "", lambda: _reward_minutes(results_dir, reward))

    ordered = {name: entries[name] for name in SPECS if name in entries}
    missing = [name for name in SPECS if name not in entries]
    return {
        **ordered,
        "missing": missing,
        "about": {
            "preset": metrics.get("preset"), "seed": seed, "fingerprint": metrics.get("fingerprint"),
            "written_utc": datetime.now(UTC).isoformat(timespec="seconds"), "bootstrap_resamples": n_resamples,
            "paper": paper.PAPER, "sources": sources, "missing_reasons": {m: reasons.get(m, "not computed") for m in missing},
            "verdict_rule": "agrees only when the 95% interval lies on the paper's side of no effect, disagrees when "
                            "on the other side, else inconclusive; fixed by design for numbers the study sets itself",
        },
    }


def write_findings(
    results_dir: Path | str, reward_dir: Path | str | None = None, n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | None = None,
) -> Path:
    """Build, validate and atomically write results_dir/findings.json; returns its path."""
    results_dir = Path(results_dir)
    findings = build_findings(results_dir, reward_dir, n_resamples=n_resamples, seed=seed)
    validate_findings(findings)
    return atomic_write_text(results_dir / FINDINGS_FILE, json.dumps(findings, indent=1, allow_nan=False) + "\n")


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object at `path`; {} when it is missing, or torn or not an object (read_json warns)."""
    record = read_json(path)
    return record if isinstance(record, dict) else {}


def load_findings(results_dir: Path | str) -> dict[str, Any] | None:
    """results_dir/findings.json, validated; None when there is none."""
    path = Path(results_dir) / FINDINGS_FILE
    if not path.exists():
        return None
    findings = json.loads(path.read_text())
    validate_findings(findings)
    return findings


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate_entry(name: str, entry: Any) -> None:
    def fail(problem: str) -> None:
        raise ValueError(f"findings metric '{name}': {problem}")

    if not isinstance(entry, Mapping):
        fail(f"entry must be an object, got {type(entry).__name__}")
    absent = [key for key in REQUIRED_KEYS if key not in entry]
    if absent:
        fail(f"missing key(s) {absent}")
    value, low, high, n = entry["value"], entry["low"], entry["high"], entry["n"]
    if not _is_number(value) or not math.isfinite(value):
        fail(f"value must be a finite number, got {value!r}")
    if low is None and high is None:
        if not entry.get("no_interval_reason"):
            fail("low and high are null without a no_interval_reason")
    else:
        for key, bound in (("low", low), ("high", high)):
            if not _is_number(bound) or not math.isfinite(bound):
                fail(f"{key} must be a finite number, got {bound!r}")
        if not low <= value <= high:
            fail(f"needs low <= value <= high, got low={low}, value={value}, high={high}")
        if not high > low:
            fail(f"zero-width interval [{low}, {high}]")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        fail(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(entry["unit"], str) or not entry["unit"]:
        fail(f"unit must be a non-empty string, got {entry['unit']!r}")
    if entry["higher_is_better"] not in (True, False, None):
        fail(f"higher_is_better must be true, false or null, got {entry['higher_is_better']!r}")
    if "paper" in entry and entry["paper"] is not None and not (_is_number(entry["paper"]) and math.isfinite(entry["paper"])):
        fail(f"paper must be a finite number or null, got {entry['paper']!r}")
    if _is_number(entry.get("paper")) and "verdict" not in entry:
        fail("has a paper number but no verdict")
    if "verdict" in entry:
        said = entry["verdict"]
        if said not in ALL_VERDICTS:
            fail(f"verdict must be one of {ALL_VERDICTS}, got {said!r}")
        if said == FIXED_BY_DESIGN and not entry.get("by_design"):
            fail("a 'fixed by design' verdict needs a by_design note saying how the study fixes it")
        if said != FIXED_BY_DESIGN:
            no_effect, side = entry.get("no_effect"), entry.get("paper_side")
            if not _is_number(no_effect) or side not in ("above", "below"):
                fail("a verdict needs no_effect (a number) and paper_side ('above' or 'below')")
            if low is None:
                fail("a verdict needs an interval")
            expected = verdict(low, high, no_effect, side, n=entry.get("n"))
            if said != expected:
                fail(f"verdict {said!r} contradicts the interval [{low}, {high}] vs no effect {no_effect} "
                     f"(paper {side}): expected {expected!r}")


def validate_findings(obj: Any) -> None:
    """Raise ValueError naming the metric and the problem when `obj` is not a valid findings record."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"findings must be a JSON object, got {type(obj).__name__}")
    missing = obj.get("missing", [])
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise ValueError("findings 'missing' must be a list of metric names")
    if "about" in obj and not isinstance(obj["about"], Mapping):
        raise ValueError("findings 'about' must be an object")
    names = [key for key in obj if key not in RESERVED]
    if not names and not missing:
        raise ValueError("findings hold no metric and list none as missing")
    for name in names:
        if name in missing:
            raise ValueError(f"findings metric '{name}': both reported and listed as missing")
        _validate_entry(name, obj[name])


# --------------------------------------------------------------------------------------------
# Tables (notebook 05, SUMMARY.md)
# --------------------------------------------------------------------------------------------


def _number(x: float, unit: str) -> str:
    return f"{x:.2f}" if unit.startswith("ratio") else f"{x:.1f}"


def format_entry(entry: Mapping[str, Any]) -> str:
    """`54.8 [38.1, 70.2]`, or the value alone when it has no interval."""
    text = _number(entry["value"], entry["unit"])
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{_number(entry['low'], entry['unit'])}, {_number(entry['high'], entry['unit'])}]"
    return text


def _note(entry: Mapping[str, Any]) -> str:
    """What a reader needs beside the number: best-of which n, the collapsed answer, a fallback interval."""
    parts = []
    if "best_of" in entry:
        parts.append(f"best-of-{entry['best_of']}")
    if "value_method" in entry:
        parts.append(f"{entry['method']} {entry['value_method']:.1f} vs {entry['baseline']} {entry['value_baseline']:.1f}")
    if "by_design" in entry:
        parts.append(entry["by_design"])
    if "Clopper-Pearson bound" in str(entry.get("interval", "")):
        parts.append("no spread: Clopper-Pearson bound")
    if "top_answer" in entry:
        parts.append(f"top answer: {json.dumps(entry['top_answer'][:40])}")
    if "Wilson" in str(entry.get("interval", "")) and "bootstrap collapsed" in str(entry.get("interval", "")):
        parts.append("Wilson interval: the bootstrap collapsed")
    return "; ".join(parts)


def findings_table(findings: Mapping[str, Any] | None) -> pd.DataFrame:
    """One row per metric: value [95% interval], n, unit, the paper's number and the verdict (strings)."""
    columns = ["metric", "this run [95% interval]", "n", "unit", "paper", "verdict", "note"]
    rows = []
    for name, entry in (findings or {}).items():
        if name in RESERVED:
            continue
        claim = paper.CLAIMS.get(name)
        rows.append({
            "metric": name, "this run [95% interval]": format_entry(entry), "n": str(entry["n"]), "unit": entry["unit"],
            "paper": (claim.text if claim.value is None else f"{claim.text}, {claim.where}") if claim is not None else "",
            "verdict": entry.get("verdict", ""), "note": _note(entry),
        })
    return pd.DataFrame(rows, columns=columns).set_index("metric")
