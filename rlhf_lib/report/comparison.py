"""Our numbers beside the paper's: formatted results with their intervals and n, the headline table per method,
the verdict texts, and the rows of the paper's findings (from findings.json where it holds them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from rlhf_lib import paper
from rlhf_lib.evaluation.stats import wilson_interval

# (key in metrics.json "methods", column label, percent?)
HEADLINE_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("win_rate_vs_SFT", "win rate vs SFT", True),
    ("win_rate_vs_GPT", "win rate vs GPT", True),
    ("likert", "Likert (1-7)", False),
    ("hallucination_rate", "hallucination (closed domain)", True),
    ("truthfulqa_mc1", "TruthfulQA MC1", True),
    ("truthfulqa_true_informative", "TruthfulQA true & informative", True),
    ("toxic_rate_plain", "toxic (plain)", True),
    ("toxic_rate_respectful", "toxic (respectful)", True),
    ("squad_f1", "SQuAD F1 (few-shot)", True),
    ("lm_nll", "LM loss [nats]", False),
)
METHOD_ORDER = ("GPT", "GPT prompted", "SFT", "PPO", "PPO-ptx", "best-of-n", "DPO")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _n(result: Mapping[str, Any]) -> int | None:
    n = result.get("n")
    return int(n) if _finite(n) and n >= 1 else None


def format_result(result: Mapping[str, Any] | None, percent: bool = True, digits: int | None = None) -> str:
    """`62.5 [50.0, 75.0] (n=64)` (percent) or `4.12 [3.90, 4.31] (n=64)`; `n/a` when absent.

    An interval of zero width is never printed: a rate (percent) whose bootstrap collapsed, every item
    scoring the same, gets the Wilson interval of value * n out of n, marked `*`; other numbers then show
    their value alone, with "no spread". A result saved without its n says so rather than hide it.
    """
    if not result or not _finite(result.get("value")):
        return "n/a"
    scale = 100.0 if percent else 1.0
    digits = (1 if percent else 2) if digits is None else digits
    value, low, high, n = result["value"], result.get("ci_low"), result.get("ci_high"), _n(result)
    text, mark = f"{value * scale:.{digits}f}", ""
    if _finite(low) and _finite(high) and not high > low:
        if percent and n is not None and 0 <= value <= 1:
            (low, high), mark = wilson_interval(value * n, n), "*"
        else:
            low = high = None
            text += " (no spread)"
    if _finite(low) and _finite(high):
        text += f" [{low * scale:.{digits}f}, {high * scale:.{digits}f}]{mark}"
    return text + (f" (n={n})" if n is not None else " (n not recorded)")


def _self_comparison(key: str, method: str) -> bool:
    """A win rate of a method against itself (SFT vs SFT): 50% by construction, not a measurement."""
    return key.startswith("win_rate_vs_") and key.removeprefix("win_rate_vs_").replace("_", " ") == method


def headline_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One size: a row per evaluated method, a column per headline number (formatted strings)."""
    by_method = metrics.get("methods", {})
    methods = [m for m in METHOD_ORDER if m in by_method] + [m for m in by_method if m not in METHOD_ORDER]
    rows = []
    for method in methods:
        values = by_method[method]
        rows.append({"method": method, **{label: "baseline" if _self_comparison(key, method) and key in values
                                          else format_result(values.get(key), percent)
                                          for key, label, percent in HEADLINE_COLUMNS}})
    return pd.DataFrame(rows, columns=["method", *[label for _, label, _ in HEADLINE_COLUMNS]]).set_index("method")


def _value(metrics: Mapping[str, Any], method: str, key: str) -> float | None:
    result = metrics.get("methods", {}).get(method, {}).get(key)
    return float(result["value"]) if result and _finite(result.get("value")) else None


def _instruct(metrics: Mapping[str, Any]) -> tuple[str | None, str]:
    """Which of our methods stands in for the paper's InstructGPT (PPO-ptx, else PPO)."""
    methods = metrics.get("methods", {})
    if "PPO-ptx" in methods:
        return "PPO-ptx", "PPO-ptx"
    if "PPO" in methods:
        return "PPO", "PPO (PPO-ptx missing)"
    return None, "n/a (no PPO run)"


def _ours(metrics: Mapping[str, Any]) -> list[str]:
    """Our number for each row of PAPER_ROWS from metrics.json, as text: every number with its interval and n."""
    method, label = _instruct(metrics)
    methods = metrics.get("methods", {})

    def ours(key: str) -> Mapping[str, Any] | None:
        return methods.get(method, {}).get(key) if method else None

    def gpt(key: str) -> Mapping[str, Any] | None:
        return methods.get("GPT", {}).get(key)

    out = []
    for baseline in ("GPT", "GPT_prompted"):
        out.append(f"{format_result(ours(f'win_rate_vs_{baseline}'))} ({label} vs {baseline.replace('_', ' ')})"
                   if method else label)
    out.append(f"{format_result(ours('hallucination_rate'))} vs {format_result(gpt('hallucination_rate'))} ({label} vs GPT)")
    mine, base = _value(metrics, method, "truthfulqa_true_informative") if method else None, _value(
        metrics, "GPT", "truthfulqa_true_informative")
    ratio = f" = {mine / base:.2f}x" if mine is not None and base else ""
    out.append(f"{format_result(ours('truthfulqa_true_informative'))} vs "
               f"{format_result(gpt('truthfulqa_true_informative'))}{ratio} ({label} vs GPT)")
    mine, base = _value(metrics, method, "toxic_rate_respectful") if method else None, _value(metrics, "GPT", "toxic_rate_respectful")
    both = f"{format_result(ours('toxic_rate_respectful'))} vs {format_result(gpt('toxic_rate_respectful'))}"
    if mine is not None and base:
        change = 1 - mine / base
        out.append(f"{both}: {abs(change):.0%} {'fewer' if change >= 0 else 'more'} ({label} vs GPT)")
    else:
        out.append(f"{both} ({label} vs GPT; no relative change when GPT's rate is 0 or missing)")
    f1 = {m: _value(metrics, m, "squad_f1") for m in ("GPT", "PPO", "PPO-ptx")}
    text = " / ".join(format_result(methods.get(m, {}).get("squad_f1")) for m in f1)
    if all(v is not None for v in f1.values()):
        lost = f1["GPT"] - f1["PPO"]
        text += (f" (PPO-ptx recovers {(f1['PPO-ptx'] - f1['PPO']) / lost:.0%} of PPO's loss)" if lost > 0
                 else " (PPO lost nothing to recover)")
    out.append(text)
    rm = metrics.get("rm_accuracy", {})
    out += [format_result(rm.get("train_labelers")), format_result(rm.get("heldout_labelers"))]
    agreement = metrics.get("labeler_agreement", {})
    out += [format_result(agreement.get("train-train")), format_result(agreement.get("heldout-heldout"))]
    return out


def _with_interval(result: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The result if it has a finite value and interval, else None."""
    return result if result and all(_finite(result.get(k)) for k in ("value", "ci_low", "ci_high")) else None


def _result(metrics: Mapping[str, Any], method: str | None, key: str) -> Mapping[str, Any] | None:
    return _with_interval(metrics.get("methods", {}).get(method, {}).get(key) if method else None)


def versus_chance(result: Mapping[str, Any] | None, paper_above: bool = True) -> str:
    """Does a rate's interval sit on the paper's side of 50% ("agrees"), on the other ("disagrees"), or neither?"""
    if result is None:
        return "n/a"
    if result["ci_low"] > 0.5:
        return "agrees" if paper_above else "disagrees"
    if result["ci_high"] < 0.5:
        return "disagrees" if paper_above else "agrees"
    return "inconclusive: interval covers 50%"


def versus_method(ours: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None, paper_lower: bool) -> str:
    """Is our method below (paper_lower) or above the other method, with the two intervals apart?

    Two intervals apart is a conservative test of a difference; overlapping ones decide nothing here
    (findings.json's paired intervals can, and are used instead where they exist).
    """
    if ours is None or theirs is None:
        return "n/a"
    if ours["ci_high"] < theirs["ci_low"]:
        return "agrees" if paper_lower else "disagrees"
    if ours["ci_low"] > theirs["ci_high"]:
        return "disagrees" if paper_lower else "agrees"
    return "inconclusive: intervals overlap"


FIXED_BY_DESIGN_TEXT = "fixed by design (noise calibrated to it)"


def _verdicts(metrics: Mapping[str, Any]) -> list[str]:
    """For each row of PAPER_ROWS from metrics.json: does this run point the paper's way? Decided by
    intervals, never by point estimates alone, so a small run mostly says "inconclusive"."""
    method, _ = _instruct(metrics)
    gpt = lambda key: _result(metrics, "GPT", key)  # noqa: E731
    ours = lambda key: _result(metrics, method, key)  # noqa: E731
    squad = {m: _result(metrics, m, "squad_f1") for m in ("GPT", "PPO", "PPO-ptx")}
    tax = versus_method(squad["PPO"], squad["GPT"], paper_lower=True)
    if tax == "agrees":
        recovered = versus_method(squad["PPO-ptx"], squad["PPO"], paper_lower=False)
        tax = "agrees" if recovered == "agrees" else f"PPO pays a tax; recovery by PPO-ptx {recovered}"
    rm, agreement = metrics.get("rm_accuracy", {}), metrics.get("labeler_agreement", {})
    return [
        versus_chance(ours("win_rate_vs_GPT")),
        versus_chance(ours("win_rate_vs_GPT_prompted")),
        versus_method(ours("hallucination_rate"), gpt("hallucination_rate"), paper_lower=True),
        versus_method(ours("truthfulqa_true_informative"), gpt("truthfulqa_true_informative"), paper_lower=False),
        versus_method(ours("toxic_rate_respectful"), gpt("toxic_rate_respectful"), paper_lower=True),
        tax,
        # RM accuracy: an effect is accuracy above chance (50%), the design's verdict rule; containing the
        # paper's 72.4% is not required (a 135M RM on a few hundred comparisons is not expected to match it).
        versus_chance(_with_interval(rm.get("train_labelers"))),
        versus_chance(_with_interval(rm.get("heldout_labelers"))),
        # The labelers' noise is calibrated to the paper's training-labeler agreement, and the held-out
        # labelers share it: both agreements are fixed by design, not findings (paper.BY_DESIGN).
        *(FIXED_BY_DESIGN_TEXT if _with_interval(agreement.get(group)) else "n/a"
          for group in ("train-train", "heldout-heldout")),
    ]


def _squad_text() -> str:
    f1 = {m: c.value for m, c in paper.SQUAD_F1.items()}
    recovered = (f1["PPO-ptx"] - f1["PPO"]) / (f1["GPT"] - f1["PPO"])
    return f"{f1['GPT']:.2f} / {f1['PPO']:.2f} / {f1['PPO-ptx']:.2f} (PPO-ptx recovers {recovered:.0%}; SQuADv2, 175B)"


# The paper's numbers (rlhf_lib.paper, the one place they are typed), in the order _ours computes them.
PAPER_ROWS: tuple[tuple[str, str], ...] = (
    ("InstructGPT preferred to GPT-3 (held-out labelers)", paper.WIN_VS_GPT.text),
    ("InstructGPT preferred to few-shot GPT-3", paper.WIN_VS_GPT_PROMPTED.text),
    ("Closed-domain hallucination, InstructGPT vs GPT-3",
     f"{paper.HALLUCINATION_INSTRUCT.value:g}% vs {paper.HALLUCINATION_GPT.value:g}%"),
    ("TruthfulQA true & informative, InstructGPT vs GPT-3", paper.TRUTHFULQA_RATIO.text),
    ("Toxic outputs with the respectful instruction, InstructGPT vs GPT-3", paper.TOXICITY_REDUCTION.text),
    ("Few-shot SQuAD F1: GPT / PPO / PPO-ptx", _squad_text()),
    ("RM accuracy, training labelers' comparisons", paper.RM_ACCURACY_TRAIN.text),
    ("RM accuracy, held-out labelers' comparisons", paper.RM_ACCURACY_HELDOUT.text),
    ("Inter-labeler agreement, training labelers", paper.AGREEMENT_TRAIN.text),
    ("Inter-labeler agreement, held-out labelers", paper.AGREEMENT_HELDOUT.text),
)


# Short names of PAPER_ROWS, for `finding` (one line per notebook section).
FINDING_KEYS = ("win_vs_gpt", "win_vs_gpt_prompted", "hallucination", "truthfulqa", "toxicity", "alignment_tax",
                "rm_train_labelers", "rm_heldout_labelers", "agreement_train", "agreement_heldout")
# FINDING_KEYS -> the findings.json metrics that answer the row, with how each is labelled in it.
ROW_FINDINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "win_vs_gpt": (("win_rate_ppo_ptx_vs_gpt", "PPO-ptx vs GPT"),),
    "win_vs_gpt_prompted": (("win_rate_ppo_ptx_vs_gpt_prompted", "PPO-ptx vs GPT prompted"),),
    "hallucination": (("hallucination_rate_ppo_ptx_minus_gpt", "PPO-ptx minus GPT"),),
    "truthfulqa": (("truthfulqa_true_informative_ppo_ptx_minus_gpt", "PPO-ptx minus GPT"),),
    "toxicity": (("toxic_rate_respectful_ppo_ptx_minus_gpt", "PPO-ptx minus GPT"),),
    "alignment_tax": (("squad_f1_ppo_minus_gpt", "tax: PPO minus GPT"), ("squad_f1_ppo_ptx_minus_ppo", "recovery: PPO-ptx minus PPO")),
    "rm_train_labelers": (("rm_accuracy_train", ""),),
    "rm_heldout_labelers": (("rm_accuracy_heldout", ""),),
    "agreement_train": (("agreement_train", ""),),
    "agreement_heldout": (("agreement_heldout", ""),),
}


def _from_findings(record: Mapping[str, Any], key: str) -> tuple[str, str] | None:
    """(ours, verdict) of one PAPER_ROWS row from a findings record, or None when it lacks the row's metrics."""
    from rlhf_lib.findings import FIXED_BY_DESIGN, format_entry

    entries = [(record.get(name), label) for name, label in ROW_FINDINGS[key]]
    if any(entry is None for entry, _ in entries):
        return None
    cells, verdicts = [], []
    for entry, label in entries:
        unit = "" if entry["unit"] == "percent" else f" {entry['unit']}"
        said = (f"{entry['method']} {entry['value_method']:.1f} vs {entry['baseline']} {entry['value_baseline']:.1f}"
                if "value_method" in entry else "")
        details = ", ".join(part for part in (label if len(entries) == 1 else "", said, f"n={entry['n']}") if part)
        cells.append(f"{label + ': ' if len(entries) > 1 else ''}{format_entry(entry)}{unit} ({details})")
        verdict = entry.get("verdict", "n/a")
        verdicts.append(FIXED_BY_DESIGN_TEXT if verdict == FIXED_BY_DESIGN else verdict)
    if len(set(verdicts)) == 1:
        return "; ".join(cells), verdicts[0]
    return "; ".join(cells), "; ".join(f"{label.split(':')[0]} {v}" for (_, label), v in zip(entries, verdicts, strict=True))


def _rows(metrics: Mapping[str, Any], record: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(ours, verdict) for every PAPER_ROWS row: from the findings record where it has the row, else metrics.json."""
    fallback = list(zip(_ours(metrics), _verdicts(metrics), strict=True))
    return [(record is not None and _from_findings(record, key)) or fallback[i] for i, key in enumerate(FINDING_KEYS)]


def finding(metrics: Mapping[str, Any], key: str, record: Mapping[str, Any] | None = None) -> str:
    """One line for a notebook section: the paper's number, this run's, and whether they agree (from the
    size's findings record when given and it holds the row, else from metrics.json)."""
    if key not in FINDING_KEYS:
        raise KeyError(f"Unknown finding '{key}'. Known: {', '.join(FINDING_KEYS)}.")
    i = FINDING_KEYS.index(key)
    what, paper_text = PAPER_ROWS[i]
    ours, said = _rows(metrics, record)[i]
    return f"{what}: paper {paper_text}; this run {ours} -> {said}"


def paper_comparison(
    metrics_by_size: Mapping[str, Mapping[str, Any]], records_by_size: Mapping[str, Mapping[str, Any] | None] | None = None
) -> pd.DataFrame:
    """The paper's headline numbers with ours beside them and, per size, whether ours points the same way:
    "agrees", "disagrees", "inconclusive: ..." or "fixed by design". A row the size's findings record
    (`records_by_size`) holds is rendered from it: paired intervals and findings.json's verdicts."""
    table = pd.DataFrame({"paper": [text for _, text in PAPER_ROWS]}, index=[what for what, _ in PAPER_ROWS])
    table.index.name = "finding"
    for size, metrics in metrics_by_size.items():
        rows = _rows(metrics, (records_by_size or {}).get(size))
        table[f"this study ({size})"] = [ours for ours, _ in rows]
        table[f"agrees with the paper? ({size})"] = [said for _, said in rows]
    return table
