"""The findings record's format: its constants, validation, reading, and the table notebook 05 and SUMMARY show.

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

    from rlhf_lib.findings.record import load_findings, findings_table
    findings_table(load_findings(results_dir))                      # notebook 05, SUMMARY.md
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib import paper
from rlhf_lib.evaluation.stats import VERDICTS, verdict

FINDINGS_FILE = "findings.json"
FINDINGS_FIGURE = "fig_findings.png"  # its forest plot (rlhf_lib.analysis.findings_figure), beside it
RESERVED = ("missing", "about")
REQUIRED_KEYS = ("value", "low", "high", "n", "unit", "higher_is_better")
FIXED_BY_DESIGN = "fixed by design"  # a verdict for quantities the study sets itself (DESIGN.md)
ALL_VERDICTS = (*VERDICTS, FIXED_BY_DESIGN)


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


def format_number(x: float, unit: str) -> str:
    """A finding's number as every table shows it: two decimals for ratios, one for everything else."""
    return f"{x:.2f}" if unit.startswith("ratio") else f"{x:.1f}"


def format_entry(entry: Mapping[str, Any]) -> str:
    """`54.8 [38.1, 70.2]`, or the value alone when it has no interval."""
    text = format_number(entry["value"], entry["unit"])
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{format_number(entry['low'], entry['unit'])}, {format_number(entry['high'], entry['unit'])}]"
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
