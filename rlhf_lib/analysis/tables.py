"""The stage's results as files: the tables it writes, metrics.json's headline numbers, reading them back (notebook
05, report), the copy into results/<size>/ with findings.json, and a recheck of the numbers from those copies.

    TABLES, load_tables, load_metrics   the CSV tables by name; metrics.json, with a clear error when torn
    headline_metrics                    metrics.json "methods": per method, each headline number with its interval
    export_results                      tables and metrics.json -> results/<size>/, then findings.json
    recheck_from_saved                  headline numbers recomputed from the shared files alone
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.analysis.policies import heldout_judges
from rlhf_lib.analysis.preference import BASELINE, EXTRA_BASELINES
from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_copy_file, read_json
from rlhf_lib.pipeline import RunPaths

TABLES = (
    "generations", "win_rate", "likert_flags", "hallucination", "hallucination_per_item", "truthfulqa",
    "truthfulqa_per_item", "toxicity", "toxicity_generations", "respectful_effect", "alignment_tax", "squad_per_item",
    "overoptimization", "rm_accuracy", "best_of_n_candidates", "dpo_log_history",
)


# --------------------------------------------------------------------------------------------
# metrics.json: the headline numbers
# --------------------------------------------------------------------------------------------


def _metric_dict(rows: pd.DataFrame) -> dict[str, float | int]:
    row = rows.iloc[0]
    return {key: (float(row[key]) if key != "n" else int(row[key])) for key in ("value", "ci_low", "ci_high", "n")}


def headline_metrics(tables: Mapping[str, pd.DataFrame], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{method: {headline name: {value, ci_low, ci_high, n}}} from the tidy tables."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}

    def take(table_name: str, metric: str, name: str, **filters: Any) -> None:
        table = tables.get(table_name)
        if table is None or table.empty:
            return
        sub = table[table["metric"] == metric]
        for column, value in filters.items():
            sub = sub[sub[column] == value]
        for method, rows in sub.groupby("method", sort=False):
            if method in out:
                out[method][name] = _metric_dict(rows)

    take("win_rate", "win_rate", "win_rate_vs_SFT", baseline_method=BASELINE)
    for other in EXTRA_BASELINES:
        take("win_rate", "win_rate", f"win_rate_vs_{other.replace(' ', '_')}", baseline_method=other)
    for metric in ("likert", "fails_instruction", "hallucinates", "toxic", "inappropriate_for_customer_assistant"):
        take("likert_flags", metric, metric)
    take("hallucination", "hallucination_rate", "hallucination_rate")
    for metric in ("mc1", "mc2", "true", "informative", "true_informative"):
        take("truthfulqa", metric, f"truthfulqa_{metric}")
    for condition in ("plain", "respectful"):
        take("toxicity", "toxic_rate", f"toxic_rate_{condition}", condition=condition)
        take("toxicity", "mean_toxicity", f"mean_toxicity_{condition}", condition=condition)
    for metric in ("squad_f1", "squad_em", "lm_nll", "perplexity"):
        take("alignment_tax", metric, metric)
    return {m: v for m, v in out.items() if v}


# --------------------------------------------------------------------------------------------
# Reading the results (notebook 05, report)
# --------------------------------------------------------------------------------------------


TEXT_COLUMNS = ("prompt", "completion", "answer", "prediction")


def load_tables(stage_dir: Path | str) -> dict[str, pd.DataFrame]:
    """Every CSV table the stage wrote, by name (absent tables are simply missing from the dict)."""
    stage_dir = Path(stage_dir)
    tables = {}
    for name in TABLES:
        if (stage_dir / f"{name}.csv").exists():
            table = pd.read_csv(stage_dir / f"{name}.csv")
            for column in TEXT_COLUMNS:  # CSV turns empty completions into NaN; they are empty strings
                if column in table.columns:
                    table[column] = table[column].fillna("").astype(str)
            tables[name] = table
    return tables


def load_metrics(stage_dir: Path | str) -> dict[str, Any]:
    """The metrics.json of an analysis stage (or a results folder); a clear error when it is missing or torn.

    run_analysis_stage recomputes a stage whose metrics.json is torn, so after it this only fails on a results
    folder, whose copy the next analysis run (or `run_all.py --only analysis --force`) rewrites.
    """
    path = Path(stage_dir) / "metrics.json"
    metrics = read_json(path)  # warns when torn
    if not isinstance(metrics, dict):
        raise FileNotFoundError(f"{path} is missing or unreadable (torn by an interrupted write?). Rerun the analysis: "
                                f"`python run_all.py --only analysis --force` (its stage recomputes a torn metrics.json).")
    return metrics


def export_results(stage_dir: Path | str, results_dir: Path | str, reward_dir: Path | str | None = None) -> list[Path]:
    """Copy the stage's tables and metrics.json into results_dir (the rendered, shareable results), then
    write results_dir/findings.json from those copies (rlhf_lib.findings).

    `reward_dir` (a finished reward stage) supplies the RM predictions and the stage's time; without it
    the findings fall back to results_dir's rm_predictions.csv and run_record.json, and list as missing
    whatever neither has.
    """
    stage_dir, results_dir = Path(stage_dir), Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(stage_dir.glob("*.csv")) + [stage_dir / "metrics.json"]:
        if path.exists():
            target = results_dir / ("analysis_" + path.name if path.suffix == ".csv" else path.name)
            atomic_copy_file(path, target)  # a reader (report.py, SUMMARY.md) never sees half a file
            copied.append(target)
    copied += write_findings_and_figure(results_dir, reward_dir)
    return copied


def write_findings_and_figure(results_dir: Path | str, reward_dir: Path | str | None = None) -> list[Path]:
    """results_dir/findings.json (rlhf_lib.findings) and its forest plot, fig_findings.png (SUMMARY.md opens with it)."""
    from rlhf_lib.analysis.findings_figure import plot_findings
    from rlhf_lib.findings import FINDINGS_FIGURE, load_findings, write_findings

    written = [write_findings(results_dir, reward_dir=reward_dir)]
    figure = plot_findings(load_findings(results_dir), Path(results_dir) / FINDINGS_FIGURE,
                           title=f"{Path(results_dir).name}: ours (95% interval) beside the paper's; grey tick = no effect")
    return written + ([figure] if figure is not None else [])


def recheck_from_saved(cfg: StudyConfig, paths: RunPaths, results_dir: Path | str) -> pd.DataFrame:
    """Recompute headline numbers from the shared files alone, beside the numbers metrics.json reports.

    Reads results_dir/analysis_generations.csv and analysis_truthfulqa_per_item.csv (what a reader of the
    rendered study has), the data stage's prompts and questions, and the reward stage's labeler noise.
    Win rates vs SFT are re-judged by a freshly built held-out labeler population; TruthfulQA MC1 comes
    from each question's chosen choice and its labels, "true & informative" from re-judging the saved
    answers. Columns: metric, method, reported, recomputed. A mismatch means the files and the report
    disagree::

        study = open_study("tiny"); recheck_from_saved(study.cfg, study.paths, study.results_dir)
    """
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.evaluation import preference, truthfulness

    results_dir = Path(results_dir)
    metrics = load_metrics(results_dir)
    data = StudyData.load(paths.require("data") / "study")
    judges, _ = heldout_judges(cfg, paths.stage("reward") if paths.is_done("reward") else None)
    gens = pd.read_csv(results_dir / "analysis_generations.csv", keep_default_na=False)
    rows = []
    wins = preference.win_rate_table(gens, [dict(r) for r in data.split("eval")], judges, baseline_method=BASELINE,
                                     n_resamples=10, seed=cfg.seed)
    for _, win in wins.iterrows():
        reported = metrics["methods"][win["method"]][f"win_rate_vs_{BASELINE}"]["value"]
        rows.append({"metric": f"win_rate_vs_{BASELINE}", "method": win["method"], "reported": reported,
                     "recomputed": win["value"]})
    per_item_path = results_dir / "analysis_truthfulqa_per_item.csv"
    if per_item_path.exists():
        questions = {r["id"]: dict(r) for r in data.truthfulqa}
        per_item = pd.read_csv(per_item_path, keep_default_na=False)
        for method, items in per_item.groupby("method", sort=False):
            mc1 = [float(questions[q]["mc_labels"][c] == 1) for q, c in zip(items["id"], items["chosen"], strict=True)]
            judged = truthfulness.judge_generated([questions[q] for q in items["id"]], list(items["answer"]))
            for key, value in (("truthfulqa_mc1", np.mean(mc1)), ("truthfulqa_true_informative", judged["true_informative"].mean())):
                rows.append({"metric": key, "method": method, "reported": metrics["methods"][method][key]["value"],
                             "recomputed": float(value)})
    return pd.DataFrame(rows, columns=["metric", "method", "reported", "recomputed"])
