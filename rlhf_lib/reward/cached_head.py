"""Step 2 of InstructGPT: a reward model trained on K-wise rankings.

The RM is the SFT model (as in the paper) with a scalar head read at the final token. Loss (Ouyang et
al. 2022, eq. 1): all C(K,2) pairs of one prompt's ranking form ONE batch element,

    loss(prompt) = -1/C(K,2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))      (ties dropped)

so pairs of one prompt are never split across batches (the paper found shuffled pairs overfit).
`mode="pairwise"` trains on shuffled independent pairs instead, on the same data: the ablation.
After training, a bias is set so that human-written demonstrations score a mean of 0.

Two ways to train it (`reward.method`):
- `lora` (GPU presets): LoRA adapters of the SFT model and the head, trained end to end.
- `cached_head` (CPU presets): the SFT model stays frozen and runs ONCE per completion; its last hidden
  state at the final token is cached, and the head is fitted on those features for many epochs, with
  early stopping and an L2 strength chosen on a validation split of the training prompts. The saved RM
  is the same format (SFT adapter + head), so PPO reads it the same way.

The RM scores TEXT as the policy made it: EOS is appended only to answers that ended with EOS, never to
one cut at the token budget. It re-tokenises with its own tokenizer, so one RM can judge other policies.

    from rlhf_lib.reward import RewardModel
    rm = RewardModel.load(paths.reward / "model")
    rm.score_texts(["Name a colour."], ["Red."])         # tensor([...]), demos average 0
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhf_lib import models
from rlhf_lib.artifacts import META, RewardModel, load_policy  # RewardModel re-exported: its old path
from rlhf_lib.config import StudyConfig

# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def ranked_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs of one ranking; rank 0 is best; equal ranks (ties) give no pair."""
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i, j in itertools.combinations(range(len(ranks)), 2)
        if ranks[i] != ranks[j]
    ]


def kwise_loss(scores: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """-1/#pairs * sum log sigmoid(r_w - r_l) over every untied pair of one prompt's K completions."""
    pairs = ranked_pairs(ranks)
    if not pairs:
        return scores.sum() * 0.0  # all tied: no signal, but keep the graph valid
    winners = torch.tensor([w for w, _ in pairs], device=scores.device)
    losers = torch.tensor([lo for _, lo in pairs], device=scores.device)
    return -F.logsigmoid(scores[winners] - scores[losers]).mean()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def new_reward_model(cfg: StudyConfig, init_dir: Path | str | None = None, trainable: bool = True) -> RewardModel:
    """An untrained RM, dropout off: the SFT policy in `init_dir` (the paper) or the preset's base with a fresh
    LoRA, plus a fresh scalar head. `trainable=False` freezes the body (the cached-head path trains the head only)."""
    if init_dir is not None:
        body, tokenizer = load_policy(init_dir, trainable=trainable)
        name = json.loads((Path(init_dir) / META).read_text())["base_model"]
    else:
        name = cfg.model.reward_model_name or cfg.model.name
        body = models.load_causal_lm(name, device=cfg.model.device, dtype=cfg.model.dtype, quantize_4bit=cfg.model.quantize_4bit)
        if cfg.model.finetune == "lora":
            body = models.lora_from_config(body, cfg.model)  # "default": saved straight into adapter/
        tokenizer = models.load_tokenizer(name)
        if not trainable:
            body.requires_grad_(False)
    body.eval()  # no dropout in a reward model
    device = next(body.parameters()).device
    torch.manual_seed(cfg.seed)
    head = models.ScalarHead(models.hidden_size_of(body)).to(device)
    layer = layer_index(body, cfg.reward.feature_layers[-1])
    return RewardModel(body, head, tokenizer, name, 0.0, cfg.reward.max_seq_tokens, layer, cfg.reward.pooling)


def layer_index(model: torch.nn.Module, depth: float) -> int:
    """Index into `hidden_states` of the block at `depth` (a fraction of the model's blocks; 1.0 = the last)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return max(1, round(depth * config.num_hidden_layers))


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
    features: Mapping[int, torch.Tensor], units: Sequence[RankedUnit], rc, seed: int, mode: str = "kwise"
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


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _prediction_rows(comparisons: Sequence[Mapping[str, Any]], scores_per_row: Sequence[Sequence[float]], set_name: str) -> list[dict]:
    rows = []
    for row, scores in zip(comparisons, scores_per_row, strict=True):
        for w, lo in ranked_pairs(row["ranks"]):
            rows.append({"set": set_name, "prompt_id": row["prompt_id"], "labeler_id": row["labeler_id"],
                         "score_chosen": float(scores[w]), "score_rejected": float(scores[lo])})
    return rows


def comparison_predictions(rm: RewardModel, comparisons: Sequence[dict], set_name: str) -> pd.DataFrame:
    """One row per untied pair: both scores and which one the labeler preferred (saved for recomputation)."""
    scores = [
        rm.score_texts([row["prompt"]] * len(row["completions"]), list(row["completions"]),
                       ended=row.get("completion_ended") or None).tolist()
        for row in comparisons
    ]
    return pd.DataFrame(_prediction_rows(comparisons, scores, set_name))


def preference_pair_predictions(
    rm: RewardModel | None, pairs: Sequence[dict], set_name: str = "hhh",
    scores: tuple[Sequence[float], Sequence[float]] | None = None,
) -> pd.DataFrame:
    """RM scores on human preference pairs (PREFERENCE_PAIR_FEATURES rows); `scores` = (chosen, rejected) when
    they were already computed (the cached-head path), else `rm` scores the texts."""
    if scores is None:
        prompts = [p["prompt"] for p in pairs]
        scores = (rm.score_texts(prompts, [p["chosen"] for p in pairs]).tolist(),
                  rm.score_texts(prompts, [p["rejected"] for p in pairs]).tolist())
    return pd.DataFrame(
        {
            "set": [f"{set_name}/{p['subset']}" for p in pairs],
            "prompt_id": [p["id"] for p in pairs],
            "labeler_id": "human",
            "score_chosen": list(scores[0]),
            "score_rejected": list(scores[1]),
        }
    )


def pairwise_accuracy(predictions: pd.DataFrame) -> float:
    """Share of pairs where the preferred completion scores higher (a tie counts half)."""
    diff = predictions["score_chosen"] - predictions["score_rejected"]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def calibration_table(predictions: pd.DataFrame, bins: int = 8) -> pd.DataFrame:
    """Predicted P(chosen > rejected) = sigmoid(score difference) vs how often it really was, by bin."""
    diff = (predictions["score_chosen"] - predictions["score_rejected"]).to_numpy()
    # Each pair appears once with its sign chosen at random so both halves of the curve are populated.
    rng = np.random.default_rng(0)
    flip = rng.random(len(diff)) < 0.5
    signed = np.where(flip, -diff, diff)
    outcome = np.where(flip, 0.0, 1.0)
    predicted = 1 / (1 + np.exp(-signed))
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(predicted, edges) - 1, 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "predicted": predicted, "observed": outcome})
    table = frame.groupby("bin").agg(predicted=("predicted", "mean"), observed=("observed", "mean"), n=("observed", "size"))
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The stage (notebook 03 and run_all)
# --------------------------------------------------------------------------------------------


COMPARISON_SETS = {  # file name -> the set name used in predictions.csv
    "comparisons_train.jsonl": "train prompts / training labelers",
    "comparisons_heldout_trainlabelers.jsonl": "held-out prompts / training labelers",
    "comparisons_heldout_heldoutlabelers.jsonl": "held-out prompts / held-out labelers",
}
LEARNING_CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def collect_comparisons(cfg: StudyConfig, paths, work: Path, out_dir: Path, progress: bool = True) -> dict[str, list[dict]]:
    """Sample K completions per RM prompt, calibrate the labelers on them, and rank them.

    Training prompts are ranked by training labelers; held-out prompts (never trained on) by training AND by
    held-out labelers; `labelers.labelers_per_prompt` of each population rank every prompt. Writes
    agreement.csv and the three comparison files into `out_dir`; returns {file name: rows}.
    """
    from rlhf_lib import labelers as lab
    from rlhf_lib.comparisons import sample_k_completions
    from rlhf_lib.data.study import StudyData

    data = StudyData.load(paths.require("data") / "study")
    rows = [dict(r) for r in data.split("rm")]
    samples = sample_k_completions(cfg, paths.require("sft") / "policy", rows, work / "completions.json", progress)
    completions = samples.completions

    # Labelers: calibrate the shared noise on these real samples, then measure agreement.
    train_pop = lab.make_population(cfg.labelers, "train", seed=cfg.seed)
    heldout_pop = lab.make_population(cfg.labelers, "heldout", seed=cfg.seed)
    sigma, _ = lab.calibrate_noise(train_pop, rows, completions, target=cfg.labelers.target_agreement, seed=cfg.seed)
    train_pop, heldout_pop = lab.with_noise(train_pop, sigma), lab.with_noise(heldout_pop, sigma)
    report = lab.agreement(train_pop + heldout_pop, rows, completions, seed=cfg.seed + 1)
    pd.DataFrame(report.to_rows()).assign(noise_scale=sigma).to_csv(out_dir / "agreement.csv", index=False)

    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_held = max(1, round(len(rows) * cfg.reward.heldout_fraction))
    held, trained = sorted(order[:n_held]), sorted(order[n_held:])

    def label(indices: list[int], population: list, name: str) -> list[dict]:
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return list(lab.label_comparisons(
            pick(rows), pick(completions), pick(samples.sources), population, seed=cfg.seed,
            out_path=work / f"{name}.jsonl", labelers_per_prompt=cfg.labelers.labelers_per_prompt,
            temperatures_per_prompt=pick(samples.temperatures), ended_per_prompt=pick(samples.ended), progress=progress,
        ))

    tables = {
        "comparisons_train.jsonl": label(trained, train_pop, "train_prompts_train_labelers"),
        "comparisons_heldout_trainlabelers.jsonl": label(held, train_pop, "heldout_prompts_train_labelers"),
        "comparisons_heldout_heldoutlabelers.jsonl": label(held, heldout_pop, "heldout_prompts_heldout_labelers"),
    }
    for name, table in tables.items():
        pd.DataFrame(table).to_json(out_dir / name, orient="records", lines=True)
    return tables


def train_cached_head_rms(
    cfg: StudyConfig, paths, tables: dict[str, list[dict]], out_dir: Path, progress: bool
) -> tuple[dict[str, float], pd.DataFrame]:
    """The CPU path: features from the frozen SFT model once, then the K-wise head, the shuffled-pairs
    ablation and a learning curve, all on those features. Returns (timings, predictions)."""
    from rlhf_lib.data.study import StudyData

    data = StudyData.load(paths.require("data") / "study")
    started = time.time()
    rm = new_reward_model(cfg, paths.require("sft") / "policy", trainable=False)
    layers = sorted({layer_index(rm.model, depth) for depth in cfg.reward.feature_layers})
    demos = [(r["prompt"], r["reference"], True) for r in data.split("sft")]
    hhh = list(data.hhh_pairs)
    hhh_texts = [(p["prompt"], p[side], True) for p in hhh for side in ("chosen", "rejected")]
    texts = [t for table in tables.values() for t in comparison_texts(table)] + demos + hhh_texts
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
        sft_rows = [r for row, u in zip(tables["comparisons_train.jsonl"], train_units, strict=True)
                    for r, source in zip(u.rows, row["completion_sources"], strict=True) if source == "sft"]
        _add_meta(model_dir, method="cached_head", weight_decay=result.weight_decay, epochs=result.fit.best_epoch,
                  layers_tried=layers,
                  sft_score_std=float(scores[sorted(set(sft_rows))].std()) if len(set(sft_rows)) > 1 else 1.0)
        timings[f"{mode}_seconds"] = time.time() - t0
        for name, rows in tables.items():
            per_row = [[float(scores[r]) for r in u.rows] for u in units[name]]
            predictions.append(pd.DataFrame(_prediction_rows(rows, per_row, COMPARISON_SETS[name])).assign(mode=mode))
        hhh_scores = scores[[table.keys[t] for t in hhh_texts]].view(-1, 2)
        predictions.append(preference_pair_predictions(
            None, hhh, "HHH human pairs", scores=(hhh_scores[:, 0].tolist(), hhh_scores[:, 1].tolist())).assign(mode=mode))
        if mode == "kwise":
            timings["bias"] = bias
    pd.concat(selections, ignore_index=True).to_csv(out_dir / "head_selection.csv", index=False)
    learning_curve(table.features, units, cfg, out_dir / "learning_curve.csv")
    torch.save({"keys": list(table.keys), "features": table.features}, out_dir / "features.pt")
    return timings, pd.concat(predictions, ignore_index=True)


def _add_meta(model_dir: Path, **values: Any) -> None:
    meta_path = Path(model_dir) / META
    meta = json.loads(meta_path.read_text())
    meta.update(values)
    from rlhf_lib.io import atomic_write_text

    atomic_write_text(meta_path, json.dumps(meta, indent=1))


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


def train_lora_rms(cfg: StudyConfig, paths, tables: dict[str, list[dict]], out_dir: Path, progress: bool) -> tuple[dict[str, float], pd.DataFrame]:
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


def comparison_summary(comparisons: pd.DataFrame) -> pd.DataFrame:
    """What the RM learns from, per set: prompts, rankings, labelers per prompt, K, pairs, EOS share, sources."""
    rows = []
    for set_name, frame in comparisons.groupby("set", sort=False):
        k = frame["completions"].map(len)
        pairs = frame["ranks"].map(lambda r: len(ranked_pairs(r)))
        ended = [e for flags in frame["completion_ended"] for e in flags]
        mix = pd.Series([f"{s} T={t:g}" for srcs, temps in zip(frame["completion_sources"], frame["completion_temperatures"], strict=True)
                         for s, t in zip(srcs, temps, strict=True)]).value_counts(normalize=True)
        rows.append({"set": set_name, "prompts": frame["prompt_id"].nunique(), "rankings": len(frame),
                     "labelers_per_prompt": round(len(frame) / max(1, frame["prompt_id"].nunique()), 2),
                     "K_min": int(k.min()), "K_max": int(k.max()), "K_mean": round(float(k.mean()), 2),
                     "untied_pairs": int(pairs.sum()), "ended_with_eos_%": round(100 * float(np.mean(ended)), 1),
                     **{f"{name} %": round(100 * share, 1) for name, share in mix.sort_index().items()}})
    return pd.DataFrame(rows)


def load_comparisons(rm_dir: Path | str) -> pd.DataFrame:
    """The reward stage's three comparison files in one table, with their set names in `set`."""
    return pd.concat([pd.read_json(Path(rm_dir) / name, lines=True).assign(set=set_name)
                      for name, set_name in COMPARISON_SETS.items()], ignore_index=True)


def accuracy_ceilings(cfg: StudyConfig, rm_dir: Path | str, prompt_rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Where an RM's held-out accuracy must stop: accuracy tables (as `accuracy_table`) of two noise-free judges
    built from the training-labeler population, on the same held-out comparisons as the RM.

    - "population utility": the mean of the training labelers' noise-free utilities, which sees everything they
      do (the reference answer included). No RM trained on these labels can expect to beat it: the rest is the
      labelers' noise.
    - "population utility without the reference": the same, blind to the reference-agreement criterion as any RM
      is (it never sees the reference answer). An RM must infer that part from the prompt and the completion.
    """
    import dataclasses

    from rlhf_lib import labelers as lab

    population = lab.make_population(cfg.labelers, "train", seed=cfg.seed)
    blind = [dataclasses.replace(labeler, weights={**labeler.weights, "reference": 0.0}) for labeler in population]
    rows_by_id = {str(r["id"]): r for r in prompt_rows}
    comparisons = load_comparisons(rm_dir)
    comparisons = comparisons[comparisons["set"].str.startswith("held-out")]
    parts = []
    for judge_name, judges in (("population utility", population), ("population utility without the reference", blind)):
        cache: dict[str, np.ndarray] = {}
        for record in comparisons.to_dict(orient="records"):
            prompt_id = str(record["prompt_id"])
            if prompt_id not in cache:
                scores = lab.score_completions(rows_by_id[prompt_id], record["completions"])
                cache[prompt_id] = np.mean([j.utilities_from_scores(rows_by_id[prompt_id], scores) for j in judges], axis=0)
            parts.append(pd.DataFrame(_prediction_rows([record], [cache[prompt_id].tolist()], record["set"])).assign(mode=judge_name))
    return accuracy_table(pd.concat(parts, ignore_index=True))


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with bootstrap 95% intervals per (mode, set), from saved predictions."""
    from rlhf_lib.evaluation.generalization import rm_accuracy_table

    return rm_accuracy_table(predictions, by=("mode", "set"))
