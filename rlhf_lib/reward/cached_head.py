"""`reward.method = "cached_head"` (CPU presets): the frozen SFT model runs once per completion; a linear head
is fitted on its cached features, K-wise, with early stopping and an L2 strength chosen on validation prompts."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F

from rlhf_lib import models
from rlhf_lib.artifacts import RewardModel  # RewardModel re-exported: its old path
from rlhf_lib.config import RewardConfig, StudyConfig
from rlhf_lib.reward.evaluate import COMPARISON_SETS, _prediction_rows, preference_pair_predictions
from rlhf_lib.reward.loss import ranked_pairs
from rlhf_lib.reward.model import _add_meta, layer_index, new_reward_model

if TYPE_CHECKING:
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.pipeline import RunPaths

# --------------------------------------------------------------------------------------------
# The cheap path: the frozen SFT model runs once per completion, the head is fitted on its features
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureTable:
    """Unique (prompt, response, ended) texts and their cached pooled hidden states at several layers."""

    keys: dict[tuple[str, str, bool], int]
    features: dict[int, torch.Tensor]  # layer index -> [N, H]

    def rows(self, prompt: str, responses: Sequence[str], ended: Sequence[bool]) -> list[int]:
        return [self.keys[(prompt, r, bool(e))] for r, e in zip(responses, ended, strict=True)]


def build_feature_table(
    rm: RewardModel, texts: Sequence[tuple[str, str, bool]], batch_size: int, layers: Sequence[int] | None = None,
    progress: bool = True,
) -> FeatureTable:
    """Run the frozen RM body once per distinct (prompt, response, ended); keep its pooled states at `layers`."""
    keys: dict[tuple[str, str, bool], int] = {}
    for prompt, response, ended in texts:
        keys.setdefault((prompt, response, bool(ended)), len(keys))
    unique = list(keys)
    layers = [rm.layer] if layers is None else list(layers)
    features = rm.features([p for p, _, _ in unique], [r for _, r, _ in unique], [e for _, _, e in unique],
                           batch_size=batch_size, progress=progress, desc="RM features (frozen SFT model)", layers=layers)
    return FeatureTable(keys, dict(zip(layers, features, strict=True)))


def comparison_texts(comparisons: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, bool]]:
    """Every (prompt, completion, ended) of some ranked comparisons."""
    return [
        (row["prompt"], text, bool(done))
        for row in comparisons
        for text, done in zip(row["completions"], row.get("completion_ended") or [True] * len(row["completions"]), strict=True)
    ]


@dataclass
class RankedUnit:
    """One ranking: the feature rows of its K completions and their ranks (0 = best)."""

    prompt_id: str
    rows: list[int]
    ranks: list[int]


def ranked_units(table: FeatureTable, comparisons: Sequence[Mapping[str, Any]]) -> list[RankedUnit]:
    units = []
    for row in comparisons:
        ended = row.get("completion_ended") or [True] * len(row["completions"])
        units.append(RankedUnit(str(row["prompt_id"]), table.rows(row["prompt"], row["completions"], ended), list(row["ranks"])))
    return units


def _pair_arrays(units: Sequence[RankedUnit]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winner rows, loser rows, index of the unit of each pair) over every untied pair of `units`."""
    winners, losers, unit_of = [], [], []
    for u_index, unit in enumerate(units):
        for w, lo in ranked_pairs(unit.ranks):
            winners.append(unit.rows[w])
            losers.append(unit.rows[lo])
            unit_of.append(u_index)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return as_long(winners), as_long(losers), as_long(unit_of)


def kwise_loss_of_units(scores: torch.Tensor, units: Sequence[RankedUnit]) -> torch.Tensor:
    """The paper's loss over several rankings: the mean over units of each unit's mean pair loss (kwise_loss)."""
    winners, losers, unit_of = _pair_arrays(units)
    if len(winners) == 0:
        return scores.sum() * 0.0
    pair_loss = -F.logsigmoid(scores[winners] - scores[losers])
    per_unit = torch.zeros(len(units)).index_add(0, unit_of, pair_loss)
    counts = torch.zeros(len(units)).index_add(0, unit_of, torch.ones_like(pair_loss))
    has_pairs = counts > 0
    return (per_unit[has_pairs] / counts[has_pairs]).mean()


def pair_accuracy_of_units(scores: torch.Tensor, units: Sequence[RankedUnit]) -> float:
    winners, losers, _ = _pair_arrays(units)
    if len(winners) == 0:
        return float("nan")
    diff = scores[winners] - scores[losers]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@dataclass
class HeadFit:
    """A linear head on raw features (weight [H], intercept) and how it was fitted."""

    weight: torch.Tensor
    intercept: float
    history: pd.DataFrame  # epoch, train_loss, val_loss, val_accuracy
    best_epoch: int
    val_loss: float
    val_accuracy: float


def fit_head(
    features: torch.Tensor,
    train_units: Sequence[RankedUnit],
    val_units: Sequence[RankedUnit],
    *,
    weight_decay: float,
    learning_rate: float,
    batch_prompts: int,
    max_epochs: int,
    patience: int,
    mode: str = "kwise",
    seed: int = 0,
) -> HeadFit:
    """Fit a linear scalar head on cached features with the K-wise loss (or shuffled pairs: the ablation).

    Features are standardised on the training rows (folded back into the returned weight). kwise: a batch
    holds `batch_prompts` rankings with all their pairs; pairwise: shuffled pairs, the same number of pairs
    per batch on average. With `val_units`, training stops after `patience` epochs without a lower validation
    K-wise loss and the best epoch is kept; without, it runs `max_epochs` epochs.
    """
    if mode not in ("kwise", "pairwise"):
        raise ValueError(f"mode must be 'kwise' or 'pairwise', not {mode!r}")
    train_rows = sorted({r for u in train_units for r in u.rows})
    mean = features[train_rows].mean(0)
    std = features[train_rows].std(0).clamp_min(1e-4)
    x = (features - mean) / std
    theta = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    winners, losers, unit_of = _pair_arrays(train_units)
    if len(winners) == 0:
        raise ValueError("No untied pairs to fit the reward head on.")
    n_units = len(train_units)
    pairs_per_unit = torch.zeros(n_units).index_add(0, unit_of, torch.ones(len(winners)))
    pair_batch = max(1, round(batch_prompts * len(winners) / n_units))
    diffs = x[winners] - x[losers]  # score(w) - score(l) = diffs @ theta: the head is linear
    history, best = [], (math.inf, 0, theta.detach().clone(), float("nan"))
    for epoch in range(1, max_epochs + 1):
        if mode == "kwise":
            unit_order = torch.randperm(n_units, generator=generator)
            position = torch.empty(n_units, dtype=torch.long)
            position[unit_order] = torch.arange(n_units)
            batch_of_pair = position[unit_of] // batch_prompts  # every pair of a unit lands in its unit's batch
            batches = [torch.nonzero(batch_of_pair == b).squeeze(1) for b in range(math.ceil(n_units / batch_prompts))]
        else:
            pair_order = torch.randperm(len(winners), generator=generator)
            batches = list(pair_order.split(pair_batch))
        total = 0.0
        for batch in batches:
            if len(batch) == 0:  # a batch of rankings that are all ties: no pair, no signal
                continue
            pair_loss = -F.logsigmoid(diffs[batch] @ theta)
            if mode == "kwise":  # mean over the batch's units of each unit's mean pair loss
                weights = 1.0 / pairs_per_unit[unit_of[batch]]
                loss = (pair_loss * weights).sum() / len(torch.unique(unit_of[batch]))
            else:
                loss = pair_loss.mean()
            loss = loss + weight_decay * theta.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        row = {"epoch": epoch, "train_loss": total / len(winners)}
        if val_units:
            with torch.no_grad():
                scores = x @ theta
                row["val_loss"] = float(kwise_loss_of_units(scores, val_units))
                row["val_accuracy"] = pair_accuracy_of_units(scores, val_units)
            if row["val_loss"] < best[0] - 1e-5:
                best = (row["val_loss"], epoch, theta.detach().clone(), row["val_accuracy"])
            elif epoch - best[1] >= patience:
                history.append(row)
                break
        history.append(row)
    if val_units:
        val_loss, best_epoch, chosen, val_accuracy = best
    else:
        val_loss, best_epoch, chosen, val_accuracy = float("nan"), len(history), theta.detach(), float("nan")
    weight = chosen / std
    return HeadFit(weight, float(-(weight * mean).sum()), pd.DataFrame(history), best_epoch, val_loss, val_accuracy)


def head_from_fit(fit: HeadFit, like: models.ScalarHead) -> models.ScalarHead:
    """A ScalarHead (same device and dtype as `like`) computing fit.weight . h + fit.intercept."""
    head = models.ScalarHead(fit.weight.shape[0]).to(like.linear.weight)
    with torch.no_grad():
        head.linear.weight.copy_(fit.weight.view(1, -1))
        head.linear.bias.fill_(fit.intercept)
    head.requires_grad_(False)
    return head


def split_prompt_ids(prompt_ids: Sequence[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(kept, held) prompt ids: a seeded `fraction` of the distinct prompts is held (all its rankings together)."""
    distinct = sorted(set(prompt_ids))
    random.Random(seed).shuffle(distinct)
    n_held = max(1, round(len(distinct) * fraction)) if len(distinct) > 1 else 0
    return set(distinct[n_held:]), set(distinct[:n_held])


@dataclass
class CachedHeadResult:
    fit: HeadFit
    layer: int
    weight_decay: float
    selection: pd.DataFrame  # one row per (layer, L2 strength) tried: best epoch, validation loss and accuracy


def train_cached_head(
    features: Mapping[int, torch.Tensor], units: Sequence[RankedUnit], rc: RewardConfig, seed: int,
    mode: str = "kwise"
) -> CachedHeadResult:
    """Choose the layer, L2 strength and epoch count on a validation split of the training prompts (lowest
    K-wise validation loss), then refit on all training prompts. `features`: layer index -> [N, H]."""
    kept, held = split_prompt_ids([u.prompt_id for u in units], rc.validation_fraction, seed)
    fit_units = [u for u in units if u.prompt_id in kept]
    val_units = [u for u in units if u.prompt_id in held]
    common = dict(learning_rate=rc.head_learning_rate, batch_prompts=rc.batch_prompts, mode=mode, seed=seed)
    rows, fits = [], {}
    for layer, layer_features in features.items():
        for decay in rc.head_weight_decays:
            fit = fit_head(layer_features, fit_units, val_units, weight_decay=decay, max_epochs=rc.head_max_epochs,
                           patience=rc.head_patience, **common)
            fits[(layer, decay)] = fit
            rows.append({"mode": mode, "layer": layer, "weight_decay": decay, "best_epoch": fit.best_epoch,
                         "val_loss": fit.val_loss, "val_accuracy": fit.val_accuracy, "val_prompts": len(held),
                         "fit_prompts": len(kept)})
    selection = pd.DataFrame(rows)
    layer, decay = min(fits, key=lambda key: fits[key].val_loss)
    final = fit_head(features[layer], units, [], weight_decay=decay, max_epochs=fits[(layer, decay)].best_epoch,
                     patience=1, **common)
    chosen = (selection["layer"] == layer) & (selection["weight_decay"] == decay)
    return CachedHeadResult(final, layer, decay, selection.assign(chosen=chosen))



LEARNING_CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def scored_texts(data: StudyData, tables: Mapping[str, list[dict]]) -> tuple[list, list[dict], list, list]:
    """What a cached RM method scores: (demonstrations, HHH pairs, the HHH texts, every text to cache), where
    texts are (prompt, response, ended) and the demonstrations set the bias (they score a mean of 0)."""
    demos = [(r["prompt"], r["reference"], True) for r in data.split("sft")]
    hhh = list(data.hhh_pairs)
    hhh_texts = [(p["prompt"], p[side], True) for p in hhh for side in ("chosen", "rejected")]
    texts = [t for table in tables.values() for t in comparison_texts(table)] + demos + hhh_texts
    return demos, hhh, hhh_texts, texts


def sft_score_std(scores: torch.Tensor, train_rows: Sequence[Mapping[str, Any]], train_units: Sequence[RankedUnit]) -> float:
    """The spread of the RM's scores on the SFT model's training completions (the unit PPO's EOS penalty is in)."""
    sft_rows = sorted({r for row, u in zip(train_rows, train_units, strict=True)
                       for r, source in zip(u.rows, row["completion_sources"], strict=True) if source == "sft"})
    return float(scores[sft_rows].std()) if len(sft_rows) > 1 else 1.0


def cached_predictions(scores: torch.Tensor, keys: Mapping, tables: Mapping[str, list[dict]],
                       units: Mapping[str, Sequence[RankedUnit]], hhh: list[dict], hhh_texts: list, mode: str,
                       ) -> list[pd.DataFrame]:
    """predictions.csv's rows for one RM from its score of every cached text: each comparison set, HHH pairs."""
    parts = []
    for name, rows in tables.items():
        per_row = [[float(scores[r]) for r in u.rows] for u in units[name]]
        parts.append(pd.DataFrame(_prediction_rows(rows, per_row, COMPARISON_SETS[name])).assign(mode=mode))
    hhh_scores = scores[[keys[t] for t in hhh_texts]].view(-1, 2)
    parts.append(preference_pair_predictions(
        None, hhh, "HHH human pairs", scores=(hhh_scores[:, 0].tolist(), hhh_scores[:, 1].tolist())).assign(mode=mode))
    return parts


def train_cached_head_rms(
    cfg: StudyConfig, paths: RunPaths, tables: dict[str, list[dict]], out_dir: Path, progress: bool
) -> tuple[dict[str, float], pd.DataFrame]:
    """The CPU path: features from the frozen SFT model once, then the K-wise head, the shuffled-pairs
    ablation and a learning curve, all on those features. Returns (timings, predictions)."""
    from rlhf_lib.data.study import StudyData

    data = StudyData.load(paths.require("data") / "study")
    started = time.time()
    rm = new_reward_model(cfg, paths.require("sft") / "policy", trainable=False)
    layers = sorted({layer_index(rm.model, depth) for depth in cfg.reward.feature_layers})
    demos, hhh, hhh_texts, texts = scored_texts(data, tables)
    table = build_feature_table(rm, texts, batch_size=cfg.reward.forward_batch, layers=layers, progress=progress)
    timings = {"features_seconds": time.time() - started, "feature_rows": len(table.keys)}
    units = {name: ranked_units(table, rows) for name, rows in tables.items()}
    train_units = units["comparisons_train.jsonl"]

    def scores_of(result: CachedHeadResult) -> torch.Tensor:
        return table.features[result.layer] @ result.fit.weight + result.fit.intercept

    predictions, selections = [], []
    for mode in ("kwise", "pairwise"):
        t0 = time.time()
        result = train_cached_head(table.features, train_units, cfg.reward, seed=cfg.seed, mode=mode)
        selections.append(result.selection)
        result.fit.history.assign(mode=mode).to_csv(out_dir / f"train_history_{mode}.csv", index=False)
        raw = scores_of(result)
        bias = float(raw[[table.keys[d] for d in demos]].mean())  # demonstrations score a mean of 0
        rm.head, rm.bias, rm.layer = head_from_fit(result.fit, rm.head), bias, result.layer
        model_dir = out_dir / ("model" if mode == "kwise" else "model_pairwise")
        rm.save(model_dir)
        scores = raw - bias
        _add_meta(model_dir, method="cached_head", weight_decay=result.weight_decay, epochs=result.fit.best_epoch,
                  layers_tried=layers,
                  sft_score_std=sft_score_std(scores, tables["comparisons_train.jsonl"], train_units))
        timings[f"{mode}_seconds"] = time.time() - t0
        predictions += cached_predictions(scores, table.keys, tables, units, hhh, hhh_texts, mode)
        if mode == "kwise":
            timings["bias"] = bias
    pd.concat(selections, ignore_index=True).to_csv(out_dir / "head_selection.csv", index=False)
    learning_curve(table.features, units, cfg, out_dir / "learning_curve.csv")
    torch.save({"keys": list(table.keys), "features": table.features}, out_dir / "features.pt")
    return timings, pd.concat(predictions, ignore_index=True)


def learning_curve(
    features: Mapping[int, torch.Tensor], units: Mapping[str, Sequence[RankedUnit]], cfg: StudyConfig, out_file: Path
) -> pd.DataFrame:
    """Held-out RM accuracy of the K-wise head trained on growing shares of the training prompts.

    Each share is a seeded prefix of the training prompts (all rankings of a prompt together); the L2
    layer, strength and epochs are chosen on the validation split as for the full RM. Rising accuracy at 100%
    says that more comparisons would still help.
    """
    train_units = units["comparisons_train.jsonl"]
    prompt_ids = sorted({u.prompt_id for u in train_units})
    random.Random(cfg.seed + 7).shuffle(prompt_ids)
    rows = []
    for fraction in LEARNING_CURVE_FRACTIONS:
        chosen = set(prompt_ids[: max(2, round(len(prompt_ids) * fraction))])
        subset = [u for u in train_units if u.prompt_id in chosen]
        result = train_cached_head(features, subset, cfg.reward, seed=cfg.seed)
        scores = features[result.layer] @ result.fit.weight + result.fit.intercept
        for name, set_name in COMPARISON_SETS.items():
            if name == "comparisons_train.jsonl":
                continue
            rows.append({"fraction": fraction, "train_prompts": len(chosen), "train_rankings": len(subset), "layer": result.layer,
                         "set": set_name, "accuracy": pair_accuracy_of_units(scores, units[name]) * 100,
                         "pairs": len(_pair_arrays(units[name])[0])})
    frame = pd.DataFrame(rows)
    frame.to_csv(out_file, index=False)
    return frame


