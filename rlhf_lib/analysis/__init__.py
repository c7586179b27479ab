"""Step 05, the analysis stage: every method on held-out prompts and benchmarks, judged by held-out labelers and metrics.

    from rlhf_lib.analysis import run_analysis_stage, load_tables, export_results
    stage_dir = run_analysis_stage(cfg, paths)          # cached per config fingerprint
    tables = load_tables(stage_dir)                     # {"win_rate": DataFrame, ...}
    export_results(stage_dir, results_dir, reward_dir)  # CSV / JSON copies and findings.json for results/<size>/

Modules, split by notebook 05's sections, each section's figures beside the analysis they draw
(`rlhf_lib.plots` re-exports every figure):
    stage             run_analysis_stage (cached) and `_run`, the stage's steps in order; what the stage writes
    policies          upstream policies (find_upstream), the PolicyBank, decoding, the held-out judges
    preference        win rates against SFT / GPT / GPT prompted, Likert and metadata: Figures 1 and 4
    benchmarks        hallucination, TruthfulQA, toxicity, the alignment tax: the probes, tables and figures
    overoptimization  RM score vs held-out-labeler utility along PPO, against sqrt(KL), and its figure
    reward_model      RM accuracy by comparison set (and notebook 03's RM figures)
    baselines         beyond the paper: best-of-n and DPO
    tables            the tables and metrics.json: load, headline numbers, export to results/<size>/, recheck
    cross_size        Figure 1 across sizes, one baseline and one prompt set
    figures           the figures' shared parts: colours, style, saving PNG + CSV
    training_curves   notebooks 02 and 04's figures: SFT loss, PPO curves and health
    prompt_mix        notebook 01's figure: the prompt mix against the paper's Table 1

Every name the module rlhf_lib/analysis.py had is importable from `rlhf_lib.analysis`. A test that monkeypatches a
function another one calls must patch the submodule that holds the caller (e.g. `rlhf_lib.analysis.stage._run`).
"""

from rlhf_lib.analysis.benchmarks import (
    ALIGNMENT_TAX_METHODS,
    LM_LOSS_BATCH,
    LM_LOSS_MAX_TOKENS,
    SQUAD_MAX_NEW_TOKENS,
    TOXICITY_METHODS,
    TRUTHFULQA_METHODS,
)
from rlhf_lib.analysis.cross_size import (
    CROSS_SIZE_GENERATIONS,
    CROSS_SIZE_KEY,
    CROSS_SIZE_METHODS,
    CROSS_SIZE_TABLE,
    cross_size_win_rates,
)
from rlhf_lib.analysis.findings_figure import plot_findings
from rlhf_lib.analysis.overoptimization import overoptimization_from_samples
from rlhf_lib.analysis.policies import (
    PPO_RUNS,
    Availability,
    Decoding,
    PolicyBank,
    few_shot_demonstrations,
    find_upstream,
    heldout_judges,
    upstream_state,
)
from rlhf_lib.analysis.preference import BASELINE, EXTRA_BASELINES
from rlhf_lib.analysis.reward_model import RM_SET_NAMES, rm_predictions_with_short_sets
from rlhf_lib.analysis.stage import run_analysis_stage
from rlhf_lib.analysis.tables import (
    TABLES,
    TEXT_COLUMNS,
    export_results,
    headline_metrics,
    load_metrics,
    load_tables,
    recheck_from_saved,
    write_findings_and_figure,
)

__all__ = [
    "plot_findings", "write_findings_and_figure",
    "ALIGNMENT_TAX_METHODS", "BASELINE", "CROSS_SIZE_GENERATIONS", "CROSS_SIZE_KEY", "CROSS_SIZE_METHODS",
    "CROSS_SIZE_TABLE", "EXTRA_BASELINES", "LM_LOSS_BATCH", "LM_LOSS_MAX_TOKENS", "PPO_RUNS", "RM_SET_NAMES",
    "SQUAD_MAX_NEW_TOKENS", "TABLES", "TEXT_COLUMNS", "TOXICITY_METHODS", "TRUTHFULQA_METHODS", "Availability",
    "Decoding", "PolicyBank", "cross_size_win_rates", "export_results",
    "few_shot_demonstrations", "find_upstream", "headline_metrics", "heldout_judges", "load_metrics", "load_tables",
    "overoptimization_from_samples", "recheck_from_saved", "rm_predictions_with_short_sets",
    "run_analysis_stage", "upstream_state",
]
