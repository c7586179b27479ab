"""results/index.html: one static page that links everything a run rendered, for sharing.

    python -m rlhf_lib.index_page results          # written by run_all.py at the end of every run, too

The page is built only from files present under the results folder: per size, its findings (value,
95% interval, n, the paper's number and the verdict, from findings.json), its rendered notebooks
(*.html), its figures (*.png, shown), and its records (RUN.md, run_record.json, findings.json, the
console log); at the top the summary (SUMMARY.md) and any cross-size figure. Links are relative, so the
folder can be copied, zipped or served as it is. Nothing is invented: a size without findings.json says so.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlhf_lib.config import PRESETS
from rlhf_lib.findings import RESERVED, format_entry, format_number
from rlhf_lib.io import atomic_write_text, read_json

INDEX_FILE = "index.html"
# Records worth a link when present, in the order a reader wants them.
RECORD_FILES = ("RUN.md", "run_record.json", "findings.json", "metrics.json", "run_all.log")

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; font-size: 0.9rem; }
th { background: #f3f3f3; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
.figures figure { margin: 0; width: 22rem; }
.figures img { width: 100%; border: 1px solid #ddd; }
.figures figcaption { font-size: 0.8rem; }
.agrees { color: #1a7f37; } .disagrees { color: #b42318; } .inconclusive { color: #8a6d00; }
"""


def results_sizes(results_dir: Path) -> list[str]:
    """The sizes with a folder under `results_dir` holding anything rendered, presets' order first."""
    found = [p.name for p in Path(results_dir).iterdir()
             if p.is_dir() and not p.name.startswith(".") and (any(p.glob("*.html")) or any(p.glob("*.json")))]
    return sorted(found, key=lambda s: (PRESETS.index(s) if s in PRESETS else len(PRESETS), s))


def findings_rows(findings: dict[str, Any]) -> list[dict[str, str]]:
    """One row per finding: metric, value [low, high] with its unit, n (with its unit), the paper's number, verdict;
    numbers formatted as SUMMARY.md formats them (rlhf_lib.findings.format_entry)."""
    rows = []
    for name, entry in findings.items():
        if name in RESERVED or not isinstance(entry, dict) or "value" not in entry or "unit" not in entry:
            continue
        paper = entry.get("paper")
        rows.append({
            "metric": name,
            "description": str(entry.get("description", "")),
            "value": f"{format_entry(entry)} {entry['unit']}",
            "n": f"{entry.get('n', '')} {entry.get('n_unit', '')}".strip(),
            "paper": format_number(paper, entry["unit"]) if isinstance(paper, int | float) else "",
            "verdict": str(entry.get("verdict", "")),
        })
    return rows


def _link(href: str, text: str) -> str:
    return f'<a href="{html.escape(href, quote=True)}">{html.escape(text)}</a>'


def _list(items: Iterable[str]) -> list[str]:
    items = list(items)
    return ["<ul>", *(f"<li>{item}</li>" for item in items), "</ul>"] if items else []


def _figures(paths: Iterable[Path], root: Path) -> list[str]:
    blocks = []
    for png in paths:
        href = png.relative_to(root).as_posix()
        blocks.append(f'<figure><a href="{html.escape(href, quote=True)}"><img src="{html.escape(href, quote=True)}" '
                      f'alt="{html.escape(png.stem)}"></a><figcaption>{html.escape(png.name)}'
                      "</figcaption></figure>")
    return ['<div class="figures">', *blocks, "</div>"] if blocks else []


def size_section(results_dir: Path, size: str) -> list[str]:
    """The HTML of one size: findings table, notebooks, figures, records."""
    folder = results_dir / size
    lines = [f'<h2 id="{html.escape(size, quote=True)}">{html.escape(size)}</h2>']
    findings = read_json(folder / "findings.json")
    if findings is None:
        lines.append(f"<p>No findings.json under {html.escape(size)}/ (the analysis has not run for this size).</p>")
    else:
        about = findings.get("about", {}) if isinstance(findings.get("about"), dict) else {}
        lines.append(f"<p>Preset {html.escape(str(about.get('preset', size)))}, seed "
                     f"{html.escape(str(about.get('seed', '?')))}, findings written "
                     f"{html.escape(str(about.get('written_utc', '?')))}. Intervals are 95%; n counts the independent "
                     "units that were sampled.</p>")
        lines += ["<table>", "<tr><th>finding</th><th>ours [95% interval]</th><th>n</th><th>paper</th>"
                  "<th>verdict</th></tr>"]
        for row in findings_rows(findings):
            lines.append(f'<tr><td title="{html.escape(row["description"], quote=True)}">{html.escape(row["metric"])}'
                         f'</td><td>{html.escape(row["value"])}</td><td>{html.escape(row["n"])}</td>'
                         f'<td>{html.escape(row["paper"])}</td><td class="{html.escape(row["verdict"], quote=True)}">'
                         f'{html.escape(row["verdict"])}</td></tr>')
        lines.append("</table>")
        missing = findings.get("missing") or []
        if missing:
            lines.append(f"<p>Not computed (see findings.json for why): {html.escape(', '.join(map(str, missing)))}</p>")
    notebooks = sorted(folder.glob("*.html"))
    if notebooks:
        lines += ["<h3>Rendered notebooks</h3>",
                  *_list(_link(p.relative_to(results_dir).as_posix(), p.stem) for p in notebooks)]
    figures = sorted(folder.glob("*.png"))
    if figures:
        lines += ["<h3>Figures</h3>", *_figures(figures, results_dir)]
    records = [folder / name for name in RECORD_FILES if (folder / name).exists()]
    if records:
        lines += ["<h3>Records</h3>", *_list(_link(p.relative_to(results_dir).as_posix(), p.name) for p in records)]
    return lines


def render_index(results_dir: Path | str, command: str = "python -m rlhf_lib.index_page") -> str:
    """The page's HTML for the results folder as it is on disk now."""
    results_dir = Path(results_dir)
    sizes = results_sizes(results_dir)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    lines = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>InstructGPT-style study: results</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             "<h1>InstructGPT-style study: results</h1>",
             f"<p>Written {now} by <code>{html.escape(command)}</code> from the files in this folder. Judges are "
             "simulated, rule-based held-out labelers; the paper's numbers come from 175B policies and human "
             "labelers: compare directions and rough sizes, not digits.</p>"]
    top = [_link(name, name) for name in ("SUMMARY.md",) if (results_dir / name).exists()]
    if top or sizes:
        lines += ["<p>", " · ".join(top + [_link(f"#{s}", s) for s in sizes]), "</p>"]
    lines += _figures(sorted(results_dir.glob("*.png")), results_dir)
    if not sizes:
        lines.append("<p>No size has rendered results yet: run <code>python run_all.py</code>.</p>")
    for size in sizes:
        lines += size_section(results_dir, size)
    lines += ["</body>", "</html>"]
    return "\n".join(lines) + "\n"


def write_index(results_dir: Path | str, command: str = "python -m rlhf_lib.index_page") -> Path:
    """Write `<results_dir>/index.html` (atomically); returns its path."""
    return atomic_write_text(Path(results_dir) / INDEX_FILE, render_index(results_dir, command))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results", help="the results folder (default: results)")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir).resolve()
    if not results_dir.is_dir():
        parser.error(f"{results_dir} is not a folder: pass the folder run_all.py rendered into (--output)")
    print(write_index(results_dir, f"python -m rlhf_lib.index_page {args.results_dir}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
