"""Figures of the study: one function per figure; each writes a PNG, its data as CSV beside it, returns the PNG path.

Each figure lives beside the analysis it draws, in `rlhf_lib.analysis`; this module re-exports them, so notebooks,
run_all.py and the tests keep calling `plots.plot_x`::

    from rlhf_lib import plots
    from rlhf_lib.evaluation import preference
    png = plots.plot_win_rates(preference.win_rate_table(gens, prompts, judges), "results/tiny/win_rate.png")
    # results/tiny/win_rate.png and results/tiny/win_rate.csv
    from IPython.display import Image; Image(png)          # in a notebook

Where each lives (the conventions every figure follows: `rlhf_lib.analysis.figures`):
    analysis.preference        plot_win_rates (Figure 1), plot_likert_and_flags (Figure 4); FLAG_TITLES
    analysis.benchmarks        plot_hallucination, plot_truthfulness, plot_toxicity, plot_alignment_tax;
                               METRIC_LABELS, PAPER_HALLUCINATION, PAPER_SQUAD_F1, PAPER_TOXICITY_NOTE
    analysis.overoptimization  plot_overoptimization
    analysis.reward_model      plot_rm_accuracy, plot_rm_learning_curve, plot_rm_reliability (notebooks 03, 05)
    analysis.findings_figure   plot_findings: every finding beside the paper's (SUMMARY.md)
    analysis.training_curves   plot_sft_curves (02), plot_ppo_curves, plot_ppo_health (04); PPO_SERIES,
                               STEP_COLUMNS, SFT_TRAIN_COLUMNS, SFT_VAL_COLUMNS
    analysis.prompt_mix        plot_category_mix (01)
    analysis.figures           METHOD_COLORS, and the helpers every figure shares (style, saving PNG + CSV)
"""

from rlhf_lib.analysis.benchmarks import (
    METRIC_LABELS,
    PAPER_HALLUCINATION,
    PAPER_SQUAD_F1,
    PAPER_TOXICITY_NOTE,
    plot_alignment_tax,
    plot_hallucination,
    plot_toxicity,
    plot_truthfulness,
)
from rlhf_lib.analysis.figures import METHOD_COLORS
from rlhf_lib.analysis.findings_figure import plot_findings
from rlhf_lib.analysis.overoptimization import plot_overoptimization
from rlhf_lib.analysis.preference import FLAG_TITLES, plot_likert_and_flags, plot_win_rates
from rlhf_lib.analysis.prompt_mix import plot_category_mix
from rlhf_lib.analysis.reward_model import (
    PAPER_RM_ACCURACY,
    plot_rm_accuracy,
    plot_rm_learning_curve,
    plot_rm_reliability,
)
from rlhf_lib.analysis.training_curves import (
    PPO_SERIES,
    SFT_TRAIN_COLUMNS,
    SFT_VAL_COLUMNS,
    STEP_COLUMNS,
    plot_ppo_curves,
    plot_ppo_health,
    plot_sft_curves,
)

__all__ = [
    "FLAG_TITLES", "METHOD_COLORS", "METRIC_LABELS", "PAPER_HALLUCINATION", "PAPER_RM_ACCURACY", "PAPER_SQUAD_F1",
    "PAPER_TOXICITY_NOTE", "PPO_SERIES", "SFT_TRAIN_COLUMNS", "SFT_VAL_COLUMNS", "STEP_COLUMNS", "plot_alignment_tax",
    "plot_category_mix", "plot_hallucination", "plot_likert_and_flags", "plot_overoptimization", "plot_ppo_curves",
    "plot_ppo_health", "plot_findings", "plot_rm_accuracy", "plot_rm_learning_curve", "plot_rm_reliability", "plot_sft_curves", "plot_toxicity",
    "plot_truthfulness", "plot_win_rates",
]
