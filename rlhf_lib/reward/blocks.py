"""The reward model's middle path on a CPU: train the top blocks on cached states.

    # configs/<preset>.toml              rlhf_lib.reward.stage.run_reward_stage dispatches on reward.method
    [reward]
    method = "cached_blocks"
    train_blocks = 2

`cached_head` fits only a linear head on frozen features; the end-to-end `lora` RM trains every block but costs a
full forward and backward per completion per epoch. This path sits between them: the SFT model's lower blocks run
once per completion (no gradients) and the hidden states entering block L - n (n = `reward.train_blocks`) are cached
token by token. Training then runs only the top n blocks, whose LoRA (initialised from the SFT model's) trains
together with the scalar head, with the paper's K-wise loss for several epochs, stopping early on the validation
split of the training prompts. An epoch costs about n / L of the end-to-end one.

The head starts from a `cached_head` fit on the frozen model's final-layer features (pooled as `reward.pooling`
says), so training starts from that RM and can only improve the validation loss it is selected on. The shuffled-
pairs ablation stays on that cheap head (the issue's "ablation on the cheap path"). The result is saved like every
RM (the SFT adapter with its top blocks' LoRA changed, plus the head), so PPO and the evaluation load it unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_lib import models
from rlhf_lib.artifacts import RewardModel
from rlhf_lib.config import RewardConfig, StudyConfig
from rlhf_lib.reward.cached_head import (
    FeatureTable,
    RankedUnit,
    cached_predictions,
    fit_head,
    head_from_fit,
    kwise_loss_of_units,
    pair_accuracy_of_units,
    ranked_units,
    scored_texts,
    sft_score_std,
    split_prompt_ids,
)
from rlhf_lib.reward.model import _add_meta, new_reward_model

if TYPE_CHECKING:
    from rlhf_lib.pipeline import RunPaths

# --------------------------------------------------------------------------------------------
# A slice of the decoder that shares the model's weights
# --------------------------------------------------------------------------------------------


def decoder_slice(model: nn.Module, start: int, stop: int | None, final_norm: bool) -> nn.Module:
    """The model's decoder stack cut to blocks [start, stop), sharing every weight with `model`.

    Call it with `inputs_embeds` = the hidden states entering block `start` (for start = 0: the token embeddings)
    and it returns in `last_hidden_state` the states leaving block stop - 1, after the final norm only when
    `final_norm`. The library's own forward builds the masks and rotary embeddings, so positions and padding work
    as in the full model; `check_slices` verifies that on real texts.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    view = copy.copy(decoder)  # shallow: parameters, buffers and hooks stay the model's own
    view._modules = dict(decoder._modules)  # its own table of submodules, so the swaps below leave `model` whole
    view.layers = nn.ModuleList(list(decoder.layers)[start:stop])
    if not final_norm:
        view.norm = nn.Identity()
    config = copy.copy(decoder.config)
    if getattr(config, "layer_types", None) is not None:  # models with per-block attention types (Gemma 3)
        config.layer_types = list(config.layer_types)[start:stop]
    view.config = config
    return view


def run_slice(view: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden] states leaving the slice, with positions counted over attended tokens (as
    models.hidden_states counts them)."""
    out = view(inputs_embeds=states, attention_mask=attention_mask,
               position_ids=models.position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def first_trained_block(model: nn.Module, train_blocks: int) -> int:
    """Index of the first of the top `train_blocks` blocks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_blocks = len(base.get_decoder().layers)
    if train_blocks >= n_blocks:
        raise ValueError(f"reward.train_blocks = {train_blocks}, but the model has {n_blocks} blocks: choose fewer "
                         "(or reward.method = 'lora' to train them all).")
    return n_blocks - train_blocks


# --------------------------------------------------------------------------------------------
# The cache: per text, the states entering the first trained block
# --------------------------------------------------------------------------------------------


@dataclass
class StateTable:
    """Distinct (prompt, response, ended) texts, each with its token states entering the first trained block."""

    keys: dict[tuple[str, str, bool], int]
    states: list[torch.Tensor]  # per text [tokens, hidden] (padding dropped)
    response: list[torch.Tensor]  # per text [tokens], 1 on the response's tokens

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded (states [B, T, H], attention mask [B, T], response mask [B, T]) of some texts."""
        width = max(self.states[r].shape[0] for r in rows)
        hidden = self.states[rows[0]].shape[1]
        states = torch.zeros(len(rows), width, hidden, dtype=self.states[rows[0]].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        response = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            n = self.states[r].shape[0]
            states[i, width - n :], mask[i, width - n :], response[i, width - n :] = self.states[r], 1, self.response[r]
        return states, mask, response


@torch.no_grad()
def build_state_table(rm: RewardModel, texts: Sequence[tuple[str, str, bool]], first_block: int, batch_size: int,
                      progress: bool = True) -> StateTable:
    """Run blocks [0, first_block) once per distinct text; keep each token's state entering `first_block`."""
    keys: dict[tuple[str, str, bool], int] = {}
    for prompt, response, ended in texts:
        keys.setdefault((prompt, response, bool(ended)), len(keys))
    unique = list(keys)
    lower = decoder_slice(rm.model, 0, first_block, final_norm=False)
    embed = rm.model.get_input_embeddings()
    states: list[torch.Tensor] = [torch.empty(0)] * len(unique)
    response: list[torch.Tensor] = [torch.empty(0)] * len(unique)
    order = sorted(range(len(unique)), key=lambda i: len(unique[i][0]) + len(unique[i][1]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="RM states (frozen lower blocks)", disable=not progress, unit="batch"):
        batch = rm.encode([unique[i][0] for i in chunk], [unique[i][1] for i in chunk], [unique[i][2] for i in chunk])
        mask = batch["attention_mask"]
        out = run_slice(lower, embed(batch["input_ids"]), mask).float().cpu()
        for row, i in enumerate(chunk):
            keep = mask[row].bool().cpu()
            states[i], response[i] = out[row, keep].clone(), batch["response_mask"][row, keep].cpu()
    return StateTable(keys, states, response)


def check_slices(rm: RewardModel, table: StateTable, upper: nn.Module, n_texts: int = 4) -> float:
    """Largest gap between the full model's final pooled states and the cached path's on a few texts; raises when
    the slice does not reproduce the model (an architecture whose decoder cannot start from a middle block)."""
    rows = list(range(min(n_texts, len(table.keys))))
    texts = list(table.keys)
    with torch.no_grad():
        full = rm.pooled_states([texts[r][0] for r in rows], [texts[r][1] for r in rows], [texts[r][2] for r in rows],
                                layers=[-1])[0].float().cpu()
        cached = pooled_final(upper, table, rows, rm.pooling).float().cpu()
    gap = float((full - cached).abs().max())
    scale = float(full.abs().max()) or 1.0
    if gap > 1e-3 * max(1.0, scale):
        raise RuntimeError(f"reward.method = 'cached_blocks': the decoder slice of {rm.base_name} does not reproduce "
                           f"the full model (largest gap {gap:.3g}); use reward.method = 'cached_head' or 'lora'.")
    return gap


def pooled_final(upper: nn.Module, table: StateTable, rows: Sequence[int], pooling: str) -> torch.Tensor:
    """[len(rows), hidden] pooled final-layer states of some texts, through the trained blocks."""
    param = next(upper.parameters())
    states, mask, response = table.batch(rows)
    mask, response = mask.to(param.device), response.to(param.device)
    hidden = run_slice(upper, states.to(param.device, param.dtype), mask)
    return models.pool_states(hidden, mask, response, pooling)


# --------------------------------------------------------------------------------------------
# Training: the top blocks' LoRA and the head, K-wise, early-stopped on validation prompts
# --------------------------------------------------------------------------------------------


@dataclass
class BlockFit:
    history: pd.DataFrame  # epoch (0 = the head-only start), train_loss, val_loss, val_accuracy
    best_epoch: int
    val_loss: float
    val_accuracy: float


def trainable_block_parameters(upper: nn.Module) -> list[nn.Parameter]:
    """The LoRA matrices of the sliced blocks (the frozen base weights stay frozen)."""
    return [p for name, p in upper.layers.named_parameters() if "lora_" in name]


def scores_of_rows(upper: nn.Module, head: nn.Module, table: StateTable, rows: Sequence[int], pooling: str,
                   chunk: int) -> torch.Tensor:
    """Head scores [len(rows)] through the trained blocks, `chunk` texts per forward (gradients kept)."""
    parts = [head(pooled_final(upper, table, rows[i : i + chunk], pooling).to(head.linear.weight.dtype))
             for i in range(0, len(rows), chunk)]
    return torch.cat(parts).float().cpu()


def _local(units: Sequence[RankedUnit]) -> tuple[list[int], list[RankedUnit]]:
    """The distinct rows of some units and the units re-indexed into that list."""
    rows = sorted({r for u in units for r in u.rows})
    where = {r: i for i, r in enumerate(rows)}
    return rows, [RankedUnit(u.prompt_id, [where[r] for r in u.rows], u.ranks) for u in units]


def evaluate_units(upper: nn.Module, head: nn.Module, table: StateTable, units: Sequence[RankedUnit], pooling: str,
                   chunk: int) -> tuple[float, float]:
    """(K-wise loss, pair accuracy) of the current blocks and head on some rankings; NaN for none."""
    if not units:
        return float("nan"), float("nan")
    rows, local = _local(units)
    with torch.no_grad():
        scores = scores_of_rows(upper, head, table, rows, pooling, chunk)
    return float(kwise_loss_of_units(scores, local)), pair_accuracy_of_units(scores, local)


def train_blocks(upper: nn.Module, head: nn.Module, table: StateTable, fit_units: Sequence[RankedUnit],
                 val_units: Sequence[RankedUnit], rc: RewardConfig, seed: int, progress: bool = False
                 ) -> BlockFit:
    """Train the sliced blocks' LoRA and the head with the K-wise loss (`rc.batch_prompts` rankings per step, each
    with all its pairs); after every epoch measure the validation loss, keep the best state, stop after
    `rc.block_patience` epochs without improvement. Epoch 0 is the starting point (the head-only RM). Without
    validation rankings it trains `rc.block_max_epochs` epochs and keeps the last."""
    params = trainable_block_parameters(upper)
    for p in params:
        p.requires_grad_(True)
    head.requires_grad_(True)
    trained = [*params, *head.parameters()]
    optimizer = torch.optim.Adam(trained, lr=rc.block_learning_rate)
    generator = torch.Generator().manual_seed(seed)
    val_loss, val_accuracy = evaluate_units(upper, head, table, val_units, rc.pooling, rc.forward_batch)
    history = [{"epoch": 0, "train_loss": float("nan"), "val_loss": val_loss, "val_accuracy": val_accuracy}]
    best = (val_loss, 0, [t.detach().clone() for t in trained], val_accuracy)
    n_batches = math.ceil(len(fit_units) / rc.batch_prompts)
    for epoch in range(1, rc.block_max_epochs + 1):
        order = torch.randperm(len(fit_units), generator=generator).tolist()
        total = 0.0
        for b in tqdm(range(n_batches), desc=f"RM blocks, epoch {epoch}", disable=not progress, unit="batch"):
            rows, local = _local([fit_units[i] for i in order[b * rc.batch_prompts : (b + 1) * rc.batch_prompts]])
            loss = kwise_loss_of_units(scores_of_rows(upper, head, table, rows, rc.pooling, rc.forward_batch), local)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        val_loss, val_accuracy = evaluate_units(upper, head, table, val_units, rc.pooling, rc.forward_batch)
        history.append({"epoch": epoch, "train_loss": total / n_batches, "val_loss": val_loss,
                        "val_accuracy": val_accuracy})
        if not val_units or val_loss < best[0] - 1e-5:
            best = (val_loss, epoch, [t.detach().clone() for t in trained], val_accuracy)
        elif epoch - best[1] >= rc.block_patience:
            break
    with torch.no_grad():  # the best epoch's weights (epoch 0: the head-only start, unchanged blocks)
        for t, saved in zip(trained, best[2], strict=True):
            t.copy_(saved)
    for t in trained:
        t.requires_grad_(False)
    return BlockFit(pd.DataFrame(history), best[1], best[0], best[3])


def start_head(features: torch.Tensor, fit_units: Sequence[RankedUnit], val_units: Sequence[RankedUnit],
               rc: RewardConfig, seed: int, mode: str = "kwise") -> tuple[Any, float, pd.DataFrame]:
    """The head-only RM on frozen final-layer features: each L2 strength fitted on `fit_units`, early-stopped and
    chosen on `val_units`. Returns (HeadFit, its L2 strength, one row per strength)."""
    fits = {decay: fit_head(features, fit_units, val_units, weight_decay=decay, learning_rate=rc.head_learning_rate,
                            batch_prompts=rc.batch_prompts, max_epochs=rc.head_max_epochs, patience=rc.head_patience,
                            mode=mode, seed=seed)
            for decay in rc.head_weight_decays}
    decay = min(fits, key=lambda d: fits[d].val_loss)
    rows = [{"mode": mode, "layer": -1, "weight_decay": d, "best_epoch": f.best_epoch, "val_loss": f.val_loss,
             "val_accuracy": f.val_accuracy, "chosen": d == decay} for d, f in fits.items()]
    return fits[decay], decay, pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The reward stage's training step for this method
# --------------------------------------------------------------------------------------------


def train_cached_blocks_rms(cfg: StudyConfig, paths: RunPaths, tables: Mapping[str, list[dict]],
                            out_dir: Path, progress: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """Cache the lower blocks' states once; fit the head-only start and the shuffled-pairs ablation on the frozen
    final features; train the top blocks and the head K-wise; save both RMs and every prediction.
    Returns (timings, predictions) like the other methods."""
    from rlhf_lib.data.study import StudyData

    rc = cfg.reward
    data = StudyData.load(paths.require("data") / "study")
    started = time.time()
    rm = new_reward_model(cfg, paths.require("sft") / "policy", trainable=False)
    rm.layer, rm.pooling = -1, rc.pooling
    first = first_trained_block(rm.model, rc.train_blocks)
    demos, hhh, hhh_texts, texts = scored_texts(data, tables)
    table = build_state_table(rm, texts, first, rc.forward_batch, progress)
    upper = decoder_slice(rm.model, first, None, final_norm=True)
    gap = check_slices(rm, table, upper)
    all_rows = list(range(len(table.keys)))
    with torch.no_grad():  # the frozen SFT model's final-layer features: the head-only start and the ablation
        frozen = torch.cat([pooled_final(upper, table, all_rows[i : i + rc.forward_batch], rc.pooling)
                            for i in range(0, len(all_rows), rc.forward_batch)]).float().cpu()
    timings: dict[str, Any] = {"features_seconds": time.time() - started, "feature_rows": len(table.keys),
                               "first_trained_block": first, "slice_check_max_gap": gap}
    keyed = FeatureTable(table.keys, {-1: frozen})
    units = {name: ranked_units(keyed, rows) for name, rows in tables.items()}
    train_units = units["comparisons_train.jsonl"]
    kept, held = split_prompt_ids([u.prompt_id for u in train_units], rc.validation_fraction, cfg.seed)
    fit_units = [u for u in train_units if u.prompt_id in kept]
    val_units = [u for u in train_units if u.prompt_id in held]

    def finish(mode: str, scores: torch.Tensor, model_dir: Path, **meta: Any) -> list[pd.DataFrame]:
        bias = float(scores[[table.keys[d] for d in demos]].mean())  # demonstrations score a mean of 0
        rm.bias = bias
        rm.save(model_dir)
        scores = scores - bias
        _add_meta(model_dir, method="cached_blocks",
                  sft_score_std=sft_score_std(scores, tables["comparisons_train.jsonl"], train_units), **meta)
        timings[f"{mode}_bias"] = bias
        return cached_predictions(scores, table.keys, tables, units, hhh, hhh_texts, mode)

    predictions, selections = [], []
    # The ablation on the cheap path: shuffled pairs, a head on the frozen final-layer features.
    t0 = time.time()
    pairwise, decay, selection = start_head(frozen, fit_units, val_units, rc, cfg.seed, mode="pairwise")
    selections.append(selection)
    rm.head = head_from_fit(pairwise, rm.head)
    predictions += finish("pairwise", frozen @ pairwise.weight + pairwise.intercept, out_dir / "model_pairwise",
                          weight_decay=decay, epochs=pairwise.best_epoch, ablation="shuffled pairs, head only")
    timings["pairwise_seconds"] = time.time() - t0
    # The RM: the K-wise head-only start, then the top blocks' LoRA and the head together.
    t0 = time.time()
    start, decay, selection = start_head(frozen, fit_units, val_units, rc, cfg.seed)
    selections.append(selection)
    head = head_from_fit(start, rm.head)
    fit = train_blocks(upper, head, table, fit_units, val_units, rc, cfg.seed, progress)
    fit.history.assign(mode="kwise").to_csv(out_dir / "train_history_kwise.csv", index=False)
    rm.head = head
    with torch.no_grad():
        scores = scores_of_rows(upper, head, table, all_rows, rc.pooling, rc.forward_batch)
    predictions += finish("kwise", scores, out_dir / "model", weight_decay=decay, epochs=fit.best_epoch,
                          train_blocks=rc.train_blocks, head_only_val_loss=float(fit.history["val_loss"].iloc[0]))
    timings["kwise_seconds"] = time.time() - t0
    timings["bias"] = timings.pop("kwise_bias")
    pd.concat(selections, ignore_index=True).to_csv(out_dir / "head_selection.csv", index=False)
    return timings, pd.concat(predictions, ignore_index=True)
