"""Building results/<size>/findings.json (its format: rlhf_lib.findings.record).

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlhf_lib import paper
from rlhf_lib.findings.record import FINDINGS_FILE, _validate_entry, validate_findings
from rlhf_lib.findings.sources import (
    _agreement,
    _json_object,
    _paired,
    _ppo_answers,
    _reward_minutes,
    _rm_accuracy,
    _win_rates,
)
from rlhf_lib.findings.specs import (
    AGREEMENT_GROUPS,
    DEFAULT_RESAMPLES,
    PAIRED_SOURCES,
    RM_SETS,
    SPECS,
    WIN_RATES,
    _Missing,
    paired_name,
)
from rlhf_lib.io import atomic_write_text

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



