"""The data layer: one schema (rlhf_lib.data.schema) filled by offline and Hub sources.

    from rlhf_lib.data import build_data_stage, category_mix_table
    data = build_data_stage(cfg, paths)     # StudyData: prompts (4 disjoint splits) + evaluation sets

Modules: schema (the features), bigbench (offline BIG-bench sdist source), hub (Hugging Face Hub
adapters), splits (seeded disjoint splits and the leakage check), study (StudyData and the stage).
"""

from rlhf_lib.data.schema import CATEGORIES, PAPER_CATEGORY_SHARE, SPLITS, DataError
from rlhf_lib.data.splits import check_no_leakage, make_splits, validation_split
from rlhf_lib.data.study import (
    StudyData,
    build_data_stage,
    build_study_data,
    category_mix_table,
    plot_lengths,
)

__all__ = [
    "CATEGORIES",
    "PAPER_CATEGORY_SHARE",
    "SPLITS",
    "DataError",
    "StudyData",
    "build_data_stage",
    "build_study_data",
    "category_mix_table",
    "check_no_leakage",
    "make_splits",
    "plot_lengths",
    "validation_split",
]
