"""Writing results/SUMMARY.md: the header (command, sizes, fingerprints), the findings figure, the paper's rows,
each size's findings and headline table, and the cross-size table (what it shows: rlhf_lib.report)."""


from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.report.comparison import METHOD_ORDER, format_result, headline_table, paper_comparison

SUMMARY_FILE = "SUMMARY.md"


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no optional dependency such as tabulate)."""
    header = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in frame.iterrows():
        cells = [str(index), *(str(v) for v in row.tolist())]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def _default_command(sizes: Sequence[str]) -> str:
    if sys.argv and Path(sys.argv[0]).name == "run_all.py":
        return " ".join(["python", "run_all.py", *sys.argv[1:]])
    return f"python run_all.py --sizes {','.join(sizes)}"


def findings_section(results_dir: Path, size: str) -> list[str]:
    """SUMMARY.md lines for one size's findings.json: every finding with its interval and n, the paper's
    number and the verdict, then what is missing and why (empty when the size has no findings.json)."""
    from rlhf_lib.findings import findings_table, load_findings

    title = ["", f"## {size}: findings (`{size}/findings.json`)", ""]
    try:
        record = load_findings(Path(results_dir) / size)
    except ValueError as err:  # say so in the summary rather than render numbers that break the rules
        return [*title, f"`{size}/findings.json` is invalid and is not rendered: {err}"]
    if record is None:
        return []
    lines = [*title, "n counts the independent units each interval resampled: eval prompts for win rates and shares "
             "of answers, RM prompts (each with all its pairs) for RM accuracy, the items both methods answered for a "
             "difference (`_minus_`, a paired bootstrap over them). Verdicts: \"agrees\" only when the 95% interval "
             "lies on the paper's side of no effect (50% for rates, 0 for differences), \"disagrees\" on the other "
             "side, else \"inconclusive\"; \"fixed by design\" for numbers the study sets itself.", ""]
    baseline = _baseline_line(size)
    if baseline:
        lines += [baseline, ""]
    table = findings_table(record)
    if not table.empty:
        lines.append(_markdown(table))
    for name, reason in record.get("about", {}).get("missing_reasons", {}).items():
        lines.append(f"- missing {name}: {reason}")
    return lines


def _baseline_line(size: str) -> str:
    """What this size's "GPT" rows are (the paper's GPT-3 is a pretrained LM); empty for a size with no preset."""
    from rlhf_lib.config import load_preset
    from rlhf_lib.models import baseline_description

    try:
        name = load_preset(size).model.name
    except (FileNotFoundError, KeyError, ValueError):
        return ""
    return f"Baseline: {baseline_description(name)}."


def _load_record(results_dir: Path, size: str) -> dict[str, Any] | None:
    """A size's findings record, or None when it has none or an invalid one (findings_section says so)."""
    from rlhf_lib.findings import load_findings

    try:
        return load_findings(Path(results_dir) / size)
    except ValueError:
        return None


def load_size_metrics(results_dir: Path, size: str) -> dict[str, Any] | None:
    """A size's metrics.json; None when it is missing, or torn (with a warning: its analysis must rerun)."""
    metrics = read_json(Path(results_dir) / size / "metrics.json")
    return metrics if isinstance(metrics, dict) else None


def cross_size_table(table: pd.DataFrame) -> pd.DataFrame:
    """Methods x sizes of `value [interval]` (percent) from `analysis.cross_size_win_rates`'s table."""
    from rlhf_lib.config import PRESETS

    baseline = table["baseline"].astype(str)  # e.g. SFT@tiny: that size's SFT is the tie line, not a measurement
    cells = table.assign(cell=["baseline" if f"{r['method']}@{r['size']}" == b else format_result(r)
                               for r, b in zip(table.to_dict(orient="records"), baseline, strict=True)])
    wide = cells.pivot(index="method", columns="size", values="cell")
    sizes = sorted(wide.columns, key=lambda s: PRESETS.index(s) if s in PRESETS else len(PRESETS))
    methods = [m for m in METHOD_ORDER if m in wide.index]
    return wide.reindex(index=methods, columns=sizes).fillna("n/a")


def _cross_size_section(results_dir: Path, sizes: Sequence[str]) -> list[str]:
    path = results_dir / "cross_size_win_rate.csv"  # analysis.CROSS_SIZE_TABLE, written by run_all with 2+ sizes
    if len(sizes) < 2 or not path.exists():
        return []
    table = pd.read_csv(path)
    if not set(table["size"]) <= set(sizes):
        return []  # from another selection of sizes
    return ["", f"## Across sizes: win rate vs {table['baseline'].iloc[0]} (Figure 1)", "",
            "Every size answered the largest size's held-out prompts, judged by its held-out labelers "
            "(`fig_win_rate_sizes.png`).", "", _markdown(cross_size_table(table))]


def write_summary(results_dir: Path, sizes: list[str], command: str | None = None) -> Path:
    """Write `<results_dir>/SUMMARY.md` from each size's metrics.json; returns its path.

    Sizes without results get a line saying so. The file states the command, and per size the preset,
    seed, model, analysis fingerprint and the date the analysis finished.
    """
    results_dir = Path(results_dir)
    found = {size: m for size in sizes if (m := load_size_metrics(results_dir, size)) is not None}
    missing = [size for size in sizes if size not in found]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        "# Results summary",
        "",
        f"Written {now} by `{command or _default_command(sizes)}`. Numbers are `value [95% interval] (n=items)`,",
        "rates in percent; judges are the simulated held-out labelers (rlhf_lib.labelers), baseline SFT at the",
        "same size. The paper's numbers come from 175B policies, a 6B reward model and human labelers: compare",
        "directions and rough sizes, not digits.",
        "",
        "| size | model | seed | analysis fingerprint | analysis finished (UTC) | decoding |",
        "|---|---|---|---|---|---|",
    ]
    for size, m in found.items():
        lines.append(f"| {size} | {m.get('model', '?')} | {m.get('seed', '?')} | {m.get('fingerprint', '?')} | "
                     f"{m.get('finished_utc', '?')} | {m.get('decoding', '?')} |")
    for size in missing:
        lines.append(f"| {size} | no results (`{results_dir / size / 'metrics.json'}` missing or unreadable) | | | | |")
    from rlhf_lib.findings import FINDINGS_FIGURE

    figures = [size for size in found if (results_dir / size / FINDINGS_FIGURE).exists()]
    if figures:
        lines += ["", "Every finding at a glance (ours with its 95% interval, the paper's number as a red diamond; "
                  "findings.json holds the numbers):", ""]
        lines += [f"![{size}: findings]({size}/{FINDINGS_FIGURE})" for size in figures]
    if found:
        records = {size: _load_record(results_dir, size) for size in found}
        lines += ["", "## The paper's findings beside ours", "",
                  "Rows the size's findings.json holds come from it: paired differences over the same items, with "
                  "findings.json's verdict; the others compare two methods' intervals from metrics.json. `*`: Wilson "
                  "interval of a rate whose bootstrap collapsed (every item scored the same).", "",
                  _markdown(paper_comparison(found, records))]
    for size in found:
        lines += findings_section(results_dir, size)
    for size, m in found.items():
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in m.get("counts", {}).items())
        lines += ["", f"## {size}: headline numbers per method", "", f"Counts: {counts}. `*`: Wilson interval of a rate "
                  "whose bootstrap collapsed (every item scored the same); baseline: the method a win-rate column is "
                  "judged against (50% by construction).", "", _markdown(headline_table(m))]
        for method, reason in m.get("skipped", {}).items():
            lines.append(f"- skipped {method}: {reason}")
        for note in m.get("notes", []):
            lines.append(f"- note: {note}")
    lines += _cross_size_section(results_dir, sizes)
    text = "\n".join(lines) + "\n"
    return atomic_write_text(results_dir / SUMMARY_FILE, text)
