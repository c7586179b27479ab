"""Beyond the paper, notebook 05's best-of-n and DPO section: two baselines built from the same SFT policy and RM.

    sample_best_of_n, pick_best_of_n   evaluation.best_of_n SFT samples per eval prompt, the RM's favourite kept
    _train_or_reuse_dpo                DPO (rlhf_lib.dpo) on the RM's comparisons, resumed from _work_dir if there
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib.analysis.policies import Availability, Decoding, _generate
from rlhf_lib.config import StudyConfig
from rlhf_lib.pipeline import RunPaths


def sample_best_of_n(
    model: Any, tok: Any, plain_prompts: Sequence[str], cfg: StudyConfig, dec: Decoding, progress: bool
) -> list[str]:
    """The SFT policy's evaluation.best_of_n samples per eval prompt, at the rollout temperature (prompt-major)."""
    ev, seed = cfg.evaluation, cfg.seed
    return _generate(
        model, tok, [t for t in plain_prompts for _ in range(ev.best_of_n)], dec, "best-of-n (SFT samples)",
        progress, temperature=cfg.generation.temperature, seed=seed * 7 + 1,
    )


def pick_best_of_n(
    reward_dir: Path, eval_rows: Sequence[Mapping[str, Any]], best_candidates: Sequence[str], cfg: StudyConfig,
    dec: Decoding,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score the candidates with the RM (loaded here, freed after): the best_of_n_candidates table, and the
    best-of-n method's generations (each prompt's highest-scored candidate)."""
    from rlhf_lib.artifacts import RewardModel

    size = cfg.preset
    rm = RewardModel.load(reward_dir / "model")
    n = cfg.evaluation.best_of_n
    repeated = [r["prompt"] for r in eval_rows for _ in range(n)]
    scores = rm.score_texts(repeated, best_candidates, batch_size=dec.batch_size).numpy()
    del rm
    gc.collect()
    candidates = pd.DataFrame({"prompt_id": [r["id"] for r in eval_rows for _ in range(n)],
                               "sample": list(range(n)) * len(eval_rows), "completion": best_candidates,
                               "rm_score": scores})
    best = candidates.loc[candidates.groupby("prompt_id", sort=False)["rm_score"].idxmax()]
    chosen = dict(zip(best["prompt_id"], best["completion"], strict=True))
    return candidates, pd.DataFrame({"method": "best-of-n", "size": size, "prompt_id": [r["id"] for r in eval_rows],
                                     "prompt": [r["prompt"] for r in eval_rows],
                                     "completion": [chosen[r["id"]] for r in eval_rows]})


def _work_dir(cfg: StudyConfig, paths: RunPaths) -> Path:
    """Where an interrupted analysis keeps its DPO run, so a rerun resumes without retraining."""
    return paths.root / f"work-analysis-{cfg.fingerprint('analysis')}"


def _train_or_reuse_dpo(cfg: StudyConfig, paths: RunPaths, found: Availability, out: Path, progress: bool) -> Path | None:
    """Train DPO (or reuse a finished run in the stage's work dir), copy it into `out/dpo`; None without pairs."""
    from rlhf_lib.dpo import preference_pairs, train_dpo

    work = _work_dir(cfg, paths) / "dpo"
    if not (work / "policy" / "meta.json").exists():
        rows = pd.read_json(found.reward_dir / "comparisons_train.jsonl", lines=True).to_dict(orient="records")
        pairs = preference_pairs(rows, per_prompt=cfg.evaluation.dpo_pairs_per_prompt)
        if not pairs:
            return None
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # Before training: a run killed after its policy is saved must still find its pairs beside it.
        pd.DataFrame(pairs).to_json(work / "pairs.jsonl", orient="records", lines=True)
        train_dpo(cfg, found.policies["SFT"], pairs, work, progress=progress)
    shutil.copytree(work, out / "dpo", dirs_exist_ok=True)
    return out / "dpo" / "policy"
