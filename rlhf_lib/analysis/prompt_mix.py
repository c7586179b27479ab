"""The prompt mix, notebook 01's figure: our prompts by use-case category against the paper's API distribution."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_lib.analysis.figures import (
    _PALETTE,
    _figure,
    _grouped_bars,
    _legend,
    _order,
    _require,
    _save,
    _slant_xticks,
    _style,
)
from rlhf_lib.data.schema import PAPER_CATEGORY_SHARE


def plot_category_mix(
    ours: Mapping[str, float] | pd.Series | pd.DataFrame,
    out_path: str | os.PathLike[str],
    paper: Mapping[str, float] = PAPER_CATEGORY_SHARE,
) -> Path:
    """Our prompt mix by use-case category vs the paper's API distribution (Table 1), in percent.

    `ours` is category -> count (a mapping or Series), or a DataFrame of prompts with a `category` column.
    """
    if isinstance(ours, pd.DataFrame):
        _require(ours, ["category"], "prompt table")
        counts = ours["category"].value_counts()
    else:
        counts = pd.Series(dict(ours), dtype=float)
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("The prompt mix has no prompts.")
    categories = _order(list(paper) + list(counts.index), list(paper))
    data = pd.DataFrame(
        {
            "category": categories,
            "ours_count": [float(counts.get(c, 0)) for c in categories],
            "ours_percent": [100 * float(counts.get(c, 0)) / total for c in categories],
            "paper_percent": [float(paper.get(c, np.nan)) for c in categories],
        }
    )
    long = data.melt(id_vars="category", value_vars=["ours_percent", "paper_percent"], var_name="source", value_name="value")
    long["source"] = long["source"].map({"ours_percent": f"this study (n = {int(total)})", "paper_percent": "InstructGPT API (Table 1)"})
    long["ci_low"] = long["ci_high"] = long["value"]
    sources = list(dict.fromkeys(long["source"]))
    with _style():
        fig, (ax,) = _figure(width=8.0, height=4.0)
        _grouped_bars(ax, long.dropna(subset=["value"]), "category", "source", categories, sources,
                      group_labels={c: c.replace("_", " ") for c in categories},
                      hue_colors=dict(zip(sources, [_PALETTE[0], "#b0b0b0"], strict=True)))
        ax.set_ylabel("share of prompts [%]")
        ax.set_title("Prompt mix by use-case category vs the paper's API distribution")
        _slant_xticks(ax, 30)
        _legend(ax, loc="upper right")
        return _save(fig, data, out_path)
