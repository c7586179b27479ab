"""results/SUMMARY.md: the headline numbers of every size, beside the paper's, with how they were made.

Reads `<results_dir>/<size>/metrics.json`, which notebook 05 copies there from the analysis stage
(`rlhf_lib.analysis.export_results`), and renders each size's `findings.json` (rlhf_lib.findings) with n
beside every number; run_all.py calls `write_summary` after the last notebook::

    from rlhf_lib.report import headline_table, paper_comparison, write_summary
    path = write_summary(Path("results"), ["micro", "tiny"])       # results/SUMMARY.md
    headline_table(metrics)                                         # one size: methods x headline numbers
    paper_comparison({"tiny": metrics})                             # the paper's numbers beside ours

Rates are shown in percent as `value [95% interval] (n=items)`; no interval of zero width is printed (a
rate whose bootstrap collapsed, every item scoring the same, gets the Wilson interval of its n, marked
`*`). Where a size's findings.json holds a row of the paper comparison, the row is rendered from it
(paired differences over the same items, and its verdict); otherwise from metrics.json, where intervals
of two methods are compared side by side. The paper's InstructGPT is PPO-ptx; where PPO-ptx did not run,
PPO stands in for the rows from metrics.json and the table says so. The paper's numbers are for 175B policies and a 6B
RM, trained on tens of thousands of human comparisons; ours are for the preset's model and simulated
labelers, so the comparison is about direction and rough size, not about matching digits.
"""

from rlhf_lib.report.comparison import (
    FIXED_BY_DESIGN_TEXT,
    METHOD_ORDER,
    finding,
    format_result,
    headline_table,
    paper_comparison,
    versus_chance,
    versus_method,
)
from rlhf_lib.report.summary import (
    SUMMARY_FILE,
    cross_size_table,
    findings_section,
    load_size_metrics,
    write_summary,
)

__all__ = [
    "FIXED_BY_DESIGN_TEXT", "METHOD_ORDER", "SUMMARY_FILE", "cross_size_table", "finding", "findings_section",
    "format_result", "headline_table", "load_size_metrics", "paper_comparison", "versus_chance", "versus_method",
    "write_summary",
]
