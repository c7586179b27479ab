"""`reward.method = "lora"` (GPU presets): the SFT model's LoRA adapters and the head, trained end to end,
K-wise (or on shuffled pairs: the ablation)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhf_lib.artifacts import RewardModel  # RewardModel re-exported: its old path
from rlhf_lib.config import StudyConfig
from rlhf_lib.reward.evaluate import COMPARISON_SETS, comparison_predictions, preference_pair_predictions
from rlhf_lib.reward.loss import kwise_loss, ranked_pairs
from rlhf_lib.reward.model import _add_meta, new_reward_model

if TYPE_CHECKING:
    from rlhf_lib.pipeline import RunPaths

# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class RewardTrainResult:
    model_dir: Path
    history: pd.DataFrame  # step, loss, lr, pairs
    bias: float
    seconds: float


def _cosine_lr(step: int, total: int, min_ratio: float = 0.1) -> float:
    progress = step / max(1, total)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _training_units(comparisons: Sequence[dict], mode: str) -> list[tuple[str, list[str], list[int], list[bool]]]:
    """One unit per ranking (kwise: all its completions, ranks and EOS flags) or per pair (pairwise ablation)."""
    units = []
    for row in comparisons:
        ended = list(row.get("completion_ended") or [True] * len(row["completions"]))
        if mode == "kwise":
            units.append((row["prompt"], list(row["completions"]), list(row["ranks"]), ended))
        else:
            for w, lo in ranked_pairs(row["ranks"]):
                units.append((row["prompt"], [row["completions"][w], row["completions"][lo]], [0, 1], [ended[w], ended[lo]]))
    return units


def train_reward_model(
    cfg: StudyConfig,
    comparisons: Sequence[dict],
    out_dir: Path,
    demonstrations: Sequence[tuple[str, str]] = (),
    mode: str = "kwise",
    progress: bool = True,
    init_dir: Path | str | None = None,
) -> RewardTrainResult:
    """Train an RM end to end (LoRA) on ranked comparisons (COMPARISON_FEATURES rows); save it with its demo bias.

    init_dir: the SFT policy to start from (the paper); None starts from the preset's base.

    kwise: a batch holds `reward.batch_prompts` prompts, each with all of its pairs (the paper).
    pairwise: a batch holds `batch_prompts * mean C(K,2)` shuffled pairs (same pairs per batch on average).
    """
    if mode not in ("kwise", "pairwise"):
        raise ValueError(f"mode must be 'kwise' or 'pairwise', not {mode!r}")
    out_dir = Path(out_dir)
    rm = new_reward_model(cfg, init_dir)
    units = _training_units(comparisons, mode)
    if not units:
        raise ValueError("No comparisons to train on (every ranking tied?).")
    batch_size = cfg.reward.batch_prompts
    if mode == "pairwise":
        mean_pairs = np.mean([len(ranked_pairs(r["ranks"])) for r in comparisons])
        batch_size = max(1, round(cfg.reward.batch_prompts * mean_pairs))
    steps_per_epoch = math.ceil(len(units) / batch_size)
    total_steps = steps_per_epoch * cfg.reward.epochs
    params = [p for p in rm.model.parameters() if p.requires_grad] + list(rm.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.reward.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, total_steps))
    rng = random.Random(cfg.seed)
    history = []
    started = time.time()
    rm.model.train()
    bar = tqdm(total=total_steps, desc=f"reward model ({mode})", disable=not progress)
    step = 0
    for _epoch in range(cfg.reward.epochs):
        order = list(range(len(units)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [units[i] for i in order[start : start + batch_size]]
            optimizer.zero_grad(set_to_none=True)
            # The batch's loss is a mean over its units; each forward holds at most `forward_batch`
            # sequences and is backpropagated at once, so memory is bounded and the gradient unchanged.
            loss_value, n_pairs = 0.0, 0
            if mode == "kwise":
                for prompt, completions, ranks, ended in batch:
                    scores = torch.cat([
                        rm.raw_scores([prompt] * len(idx), [completions[i] for i in idx], [ended[i] for i in idx])
                        for idx in _chunks(range(len(completions)), cfg.reward.forward_batch)
                    ])
                    loss = kwise_loss(scores, ranks) / len(batch)
                    loss.backward()
                    loss_value += loss.item()
                    n_pairs += len(ranked_pairs(ranks))
            else:
                for chunk in _chunks(batch, max(1, cfg.reward.forward_batch // 2)):
                    prompts = [p for p, c, _, _ in chunk for _ in c]
                    texts = [text for _, c, _, _ in chunk for text in c]
                    scores = rm.raw_scores(prompts, texts, [e for *_, flags in chunk for e in flags]).view(-1, 2)
                    loss = -F.logsigmoid(scores[:, 0] - scores[:, 1]).sum() / len(batch)
                    loss.backward()
                    loss_value += loss.item()
                n_pairs = len(batch)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "pairs": n_pairs})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    rm.model.eval()
    if demonstrations:
        prompts, responses = zip(*demonstrations, strict=True)
        rm.bias = 0.0
        rm.bias = float(rm.score_texts(list(prompts), list(responses)).mean())
    rm.model.requires_grad_(False)
    model_dir = out_dir / ("model" if mode == "kwise" else "model_pairwise")
    rm.save(model_dir)
    frame = pd.DataFrame(history)
    frame.to_csv(out_dir / f"train_history_{mode}.csv", index=False)
    return RewardTrainResult(model_dir, frame, rm.bias, time.time() - started)



def train_lora_rms(cfg: StudyConfig, paths: RunPaths, tables: dict[str, list[dict]], out_dir: Path, progress: bool) -> tuple[dict[str, float], pd.DataFrame]:
    """The GPU path: LoRA on the SFT model + head, end to end, K-wise and the shuffled-pairs ablation."""
    from rlhf_lib.data.study import StudyData

    data = StudyData.load(paths.require("data") / "study")
    train_cmp = tables["comparisons_train.jsonl"]
    demos = [(r["prompt"], r["reference"]) for r in data.split("sft")]
    timings: dict[str, float] = {}
    predictions = []
    for mode in ("kwise", "pairwise"):
        result = train_reward_model(cfg, train_cmp, out_dir, demonstrations=demos, mode=mode, progress=progress,
                                    init_dir=paths.require("sft") / "policy")
        timings[f"{mode}_seconds"] = result.seconds
        rm = RewardModel.load(result.model_dir)
        sft_scores = [s for row in train_cmp for s, src in zip(
            rm.score_texts([row["prompt"]] * len(row["completions"]), row["completions"], ended=row["completion_ended"]).tolist(),
            row["completion_sources"], strict=True) if src == "sft"]
        _add_meta(result.model_dir, method="lora", sft_score_std=float(np.std(sft_scores, ddof=1)) if len(sft_scores) > 1 else 1.0)
        parts = [comparison_predictions(rm, rows, COMPARISON_SETS[name]) for name, rows in tables.items()]
        parts.append(preference_pair_predictions(rm, list(data.hhh_pairs), "HHH human pairs"))
        predictions.append(pd.concat(parts, ignore_index=True).assign(mode=mode))
        if mode == "kwise":
            timings["bias"] = result.bias
        del rm
    return timings, pd.concat(predictions, ignore_index=True)


