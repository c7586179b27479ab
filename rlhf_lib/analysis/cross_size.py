"""Across sizes: Figure 1 with one baseline for every size (run_all.py draws it once two or more sizes are analysed).

    cross_size_win_rates   every size's GPT / SFT / PPO / PPO-ptx on the largest size's eval prompts, judged by its
                           held-out labelers against its SFT; CROSS_SIZE_TABLE and CROSS_SIZE_GENERATIONS, reused
                           while CROSS_SIZE_KEY says no size's analysis finished again since
"""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib.analysis.policies import (
    Decoding,
    PolicyBank,
    _done_record,
    _generate,
    find_upstream,
    heldout_judges,
)
from rlhf_lib.analysis.preference import BASELINE
from rlhf_lib.analysis.tables import load_tables
from rlhf_lib.config import StudyConfig
from rlhf_lib.evaluation.base import sort_frame
from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.pipeline import RunPaths

CROSS_SIZE_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx")  # the lines of the paper's Figure 1 (few-shot GPT: per size, in 05)
CROSS_SIZE_TABLE, CROSS_SIZE_GENERATIONS, CROSS_SIZE_KEY = "cross_size_win_rate.csv", "cross_size_generations.csv", "cross_size.json"


def _answer(cfg: StudyConfig, paths: RunPaths, rows: Sequence[Mapping[str, Any]], progress: bool) -> pd.DataFrame:
    """Greedy answers of one size's GPT / SFT / PPO / PPO-ptx to the given prompt rows (that size's decoding)."""
    from rlhf_lib.prompting import format_prompt

    found = find_upstream(paths)
    bank = PolicyBank(cfg, found.policies["SFT"])
    for method in CROSS_SIZE_METHODS:
        if method in found.policies and method != "SFT":
            bank.add(method, found.policies[method])
    texts = [format_prompt(bank.tokenizer, r["prompt"]) for r in rows]
    dec, parts = Decoding.from_config(cfg), []
    for method in [m for m in CROSS_SIZE_METHODS if m == "GPT" or m in found.policies]:
        with bank.use(method) as model:
            completions = _generate(model, bank.tokenizer, texts, dec, f"{cfg.preset} {method} (cross-size prompts)", progress)
        parts.append(pd.DataFrame({"method": method, "size": cfg.preset, "prompt_id": [r["id"] for r in rows],
                                   "prompt": [r["prompt"] for r in rows], "completion": completions}))
    del bank
    gc.collect()
    return pd.concat(parts, ignore_index=True)


def cross_size_win_rates(
    studies: Sequence[tuple[StudyConfig, RunPaths]], out_dir: Path | str, progress: bool = True
) -> pd.DataFrame | None:
    """Win rate of every method x size against SFT at the largest size run (the paper's Figure 1).

    All sizes answer the same prompts, the largest size's held-out eval prompts, and the largest size's
    held-out labelers judge them (its reward stage calibrated their noise). The largest size's outputs are
    its analysis stage's generations; every other size's policies answer here, greedily. Needs two or
    more sizes with a finished analysis (else None). Writes CROSS_SIZE_TABLE and CROSS_SIZE_GENERATIONS
    to out_dir and reuses them while no size's analysis has finished again since (CROSS_SIZE_KEY).
    """
    from rlhf_lib.config import PRESETS
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.evaluation import preference

    done = [(cfg, paths) for cfg, paths in studies if paths.is_done("analysis")]
    if len({cfg.preset for cfg, _ in done}) < 2:
        return None
    largest_cfg, largest_paths = max(done, key=lambda s: PRESETS.index(s[0].preset) if s[0].preset in PRESETS else -1)
    out_dir = Path(out_dir)
    key = {"largest": largest_cfg.preset, "analysis_finished": {cfg.preset: _done_record(paths, "analysis")["finished_utc"]
                                                                 for cfg, paths in done}}
    table_path, key_path = out_dir / CROSS_SIZE_TABLE, out_dir / CROSS_SIZE_KEY
    if table_path.exists() and read_json(key_path) == key:
        return pd.read_csv(table_path)

    rows = [dict(r) for r in StudyData.load(largest_paths.require("data") / "study").split("eval")]
    judges, _ = heldout_judges(largest_cfg, find_upstream(largest_paths).reward_dir)
    largest = load_tables(largest_paths.stage("analysis"))["generations"]
    parts = [largest[largest["method"].isin(CROSS_SIZE_METHODS)]]
    parts += [_answer(cfg, paths, rows, progress) for cfg, paths in done if cfg.preset != largest_cfg.preset]
    gens = sort_frame(pd.concat(parts, ignore_index=True))
    table = preference.win_rate_table(gens, rows, judges, baseline_method=BASELINE, baseline_size=largest_cfg.preset,
                                      n_resamples=largest_cfg.evaluation.bootstrap_samples, seed=largest_cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / CROSS_SIZE_GENERATIONS, gens.to_csv(index=False))
    atomic_write_text(table_path, table.to_csv(index=False))
    atomic_write_text(key_path, json.dumps(key, indent=1))  # last: the key vouches for the two tables
    return table
