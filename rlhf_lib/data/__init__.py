"""The data layer: one schema (rlhf_lib.data.schema) filled by offline and Hub sources."""

from rlhf_lib.data.schema import CATEGORIES, SPLITS, DataError

__all__ = ["CATEGORIES", "SPLITS", "DataError"]
