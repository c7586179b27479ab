"""One reader per group of findings: each turns the files of results/<size>/ (and the reward stage) into entries.

Win rates (analysis_win_rate.csv), paired differences (PAIRED_SOURCES' per-item tables), labeler agreement,
PPO's answers (distinct, top answer, length), RM accuracy (predictions.csv) and the reward stage's minutes.
A reader whose inputs are absent raises _Missing with the reason, which findings.json keeps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.evaluation.base import MetricResult
from rlhf_lib.evaluation.stats import (
    cluster_ratio,
    clustered_accuracy,
    paired_bootstrap,
    proportion,
)
from rlhf_lib.findings.specs import (
    AGREEMENT_GROUPS,
    BASELINE,
    PAIRED_SOURCES,
    RM_SETS,
    SPECS,
    WIN_RATES,
    _entry,
    _Missing,
    _non_degenerate,
    paired_name,
)
from rlhf_lib.io import read_json


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

def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object at `path`; {} when it is missing, or torn or not an object (read_json warns)."""
    record = read_json(path)
    return record if isinstance(record, dict) else {}
