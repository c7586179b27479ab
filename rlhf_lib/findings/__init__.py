"""results/<size>/findings.json: the one machine-readable record of this study's findings.

    from rlhf_lib.findings import write_findings, load_findings, findings_table, validate_findings
    write_findings(results_dir, reward_dir=paths.stage("reward"))   # called by analysis.export_results
    findings_table(load_findings(results_dir))                      # notebook 05, SUMMARY.md

Modules, in the order a finding is made:
    specs    what each metric is (SPECS), where paired differences come from, how an entry gets its claim
    sources  one reader per group of findings, from the files of results/<size>/ and the reward stage
    build    build_findings / write_findings: every spec read, missing ones named with why, the record written
    record   the format: constants, validation, load_findings, and the table notebook 05 and SUMMARY show
"""

from rlhf_lib.findings.build import build_findings, write_findings
from rlhf_lib.findings.record import (
    ALL_VERDICTS,
    FINDINGS_FIGURE,
    FINDINGS_FILE,
    FIXED_BY_DESIGN,
    REQUIRED_KEYS,
    RESERVED,
    findings_table,
    format_entry,
    format_number,
    load_findings,
    validate_findings,
)
from rlhf_lib.findings.specs import DEFAULT_RESAMPLES, PAIRED, PAIRED_SOURCES, SPECS, paired_name

__all__ = [
    "ALL_VERDICTS", "DEFAULT_RESAMPLES", "FINDINGS_FIGURE", "FINDINGS_FILE", "FIXED_BY_DESIGN", "PAIRED", "PAIRED_SOURCES",
    "REQUIRED_KEYS", "RESERVED", "SPECS", "build_findings", "findings_table", "format_entry", "format_number", "load_findings",
    "paired_name", "validate_findings", "write_findings",
]
