"""The cached-blocks RM: decoder slices reproduce the model, only the top blocks' LoRA and the head train, the best
validation epoch is kept, and the saved RM scores texts exactly as the cached path did."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from rlhf_lib import models
from rlhf_lib.config import load_preset
from rlhf_lib.reward import RankedUnit, RewardModel, comparison_predictions, new_reward_model
from rlhf_lib.reward.blocks import (
    build_state_table,
    decoder_slice,
    evaluate_units,
    first_trained_block,
    run_slice,
    train_blocks,
    train_cached_blocks_rms,
)

GOOD = ["Thank you, here is a kind answer.", "Sure, happy to help you with that."]
BAD = ["No. Go away.", "Whatever, idiot."]


def _micro_rm(cfg) -> RewardModel:
    """A micro RM whose LoRA does something (B = 0 would make the adapter a no-op)."""
    rm = new_reward_model(cfg, trainable=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in rm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return rm


def _rankings(n_prompts: int, labeler: str = "L0") -> list[dict]:
    """Polite completions ranked above rude ones, one cut at the token budget (no EOS)."""
    return [{"prompt_id": f"p{i}", "prompt": f"Question number {i}?", "labeler_id": labeler,
             "completions": [GOOD[i % 2], BAD[i % 2], GOOD[(i + 1) % 2], BAD[(i + 1) % 2]],
             "completion_ended": [True, True, False, True], "completion_sources": ["sft", "base", "sft", "base"],
             "ranks": [0, 1, 0, 1]} for i in range(n_prompts)]  # the two polite answers tie


def _texts(rows: list[dict]) -> list[tuple[str, str, bool]]:
    return [(r["prompt"], c, e) for r in rows for c, e in zip(r["completions"], r["completion_ended"], strict=True)]


def _units(table, rows: list[dict]) -> list[RankedUnit]:
    return [RankedUnit(r["prompt_id"], [table.keys[(r["prompt"], c, e)] for c, e in
                                        zip(r["completions"], r["completion_ended"], strict=True)], r["ranks"])
            for r in rows]


def test_decoder_slices_reproduce_the_full_models_states():
    rm = _micro_rm(load_preset("micro"))
    batch = rm.encode(["Hi?", "A much longer question about rivers and lakes?"], ["Hello there.", "No."], [True, False])
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # left padding is part of the check
    full = models.hidden_states(rm.model, batch["input_ids"], mask)
    first = first_trained_block(rm.model, 1)
    lower = run_slice(decoder_slice(rm.model, 0, first, final_norm=False), rm.model.get_input_embeddings()(
        batch["input_ids"]), mask)
    upper = run_slice(decoder_slice(rm.model, first, None, final_norm=True), lower, mask)
    real = mask.bool()
    torch.testing.assert_close(lower[real], full[first][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(upper[real], full[-1][real], atol=1e-5, rtol=0)
    assert len(rm.model.get_base_model().get_decoder().layers) == models.MICRO_CONFIG["num_hidden_layers"]  # intact


def test_too_many_trained_blocks_is_a_clear_error():
    rm = _micro_rm(load_preset("micro"))
    with pytest.raises(ValueError, match="train_blocks = 2, but the model has 2 blocks"):
        first_trained_block(rm.model, 2)


def test_block_training_learns_a_toy_preference_and_changes_only_the_top_blocks_lora_and_the_head():
    cfg = load_preset("micro", {"reward.block_learning_rate": 3e-3, "reward.block_max_epochs": 12,
                                "reward.block_patience": 12, "reward.batch_prompts": 2, "reward.forward_batch": 5})
    rm = _micro_rm(cfg)
    rows = _rankings(10)
    first = first_trained_block(rm.model, 1)
    table = build_state_table(rm, _texts(rows), first, batch_size=3, progress=False)
    upper = decoder_slice(rm.model, first, None, final_norm=True)
    before = {name: p.detach().clone() for name, p in rm.model.named_parameters()}
    units = _units(table, rows)
    fit_units, val_units = units[:7], units[7:]
    start_loss, start_accuracy = evaluate_units(upper, rm.head, table, val_units, cfg.reward.pooling, 5)
    fit = train_blocks(upper, rm.head, table, fit_units, val_units, cfg.reward, seed=0)

    loss, accuracy = evaluate_units(upper, rm.head, table, val_units, cfg.reward.pooling, 5)
    assert accuracy > 0.9 and loss < start_loss
    # the kept epoch is the best one (an improvement under 1e-5 does not count as one)
    assert fit.best_epoch > 0 and fit.val_loss == pytest.approx(fit.history["val_loss"].min(), abs=1e-5)
    assert loss == pytest.approx(fit.val_loss, abs=1e-5)  # the best epoch's weights were restored
    changed = {name for name, p in rm.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name and f"layers.{first}." in name for name in changed)
    assert not any(p.requires_grad for p in rm.model.parameters())  # frozen again for scoring


def test_without_improvement_the_head_only_start_is_kept():
    cfg = load_preset("micro", {"reward.block_learning_rate": 0.0, "reward.block_max_epochs": 3,
                                "reward.block_patience": 1})
    rm = _micro_rm(cfg)
    rows = _rankings(4)
    first = first_trained_block(rm.model, 1)
    table = build_state_table(rm, _texts(rows), first, batch_size=4, progress=False)
    units = _units(table, rows)
    fit = train_blocks(decoder_slice(rm.model, first, None, True), rm.head, table, units[:2], units[2:], cfg.reward, 0)
    assert fit.best_epoch == 0 and list(fit.history["epoch"]) == [0, 1]  # lr 0: nothing improves, patience 1


@pytest.mark.slow
def test_the_saved_rm_scores_texts_exactly_as_the_cached_blocks_did(tmp_path):
    """The whole method on micro study artifacts: the published RM, loaded as PPO and the evaluation load it,
    gives the scores its predictions.csv holds (the top blocks' trained LoRA travels in the adapter)."""
    from test_analysis import _fake_upstream

    cfg, paths, _ = _fake_upstream(tmp_path / "runs", reward=False, ppo=False)
    cfg = load_preset("micro", {"reward.method": "cached_blocks", "reward.train_blocks": 1,
                                "reward.block_max_epochs": 2, "reward.head_max_epochs": 5, "reward.max_seq_tokens": 128})
    tables = {"comparisons_train.jsonl": _rankings(6) + _rankings(6, labeler="L1"),
              "comparisons_heldout_trainlabelers.jsonl": _rankings(2),
              "comparisons_heldout_heldoutlabelers.jsonl": _rankings(2, labeler="H0")}
    out = tmp_path / "reward"
    out.mkdir()
    timings, predictions = train_cached_blocks_rms(cfg, paths, tables, out, progress=False)

    assert set(predictions["mode"]) == {"kwise", "pairwise"} and timings["first_trained_block"] == 1
    assert timings["slice_check_max_gap"] < 1e-4
    history = pd.read_csv(out / "train_history_kwise.csv")
    assert history["epoch"].iloc[0] == 0  # the head-only start is the first row
    assert json.loads((out / "model" / "meta.json").read_text())["epochs"] >= 1  # a trained epoch was kept...
    trained, start = (load_file(next((out / d / "adapter").rglob("*.safetensors"))) for d in ("model", "model_pairwise"))
    differs = {name for name in trained if not torch.equal(trained[name], start[name])}
    assert differs and all("layers.1." in name for name in differs)  # ...and only the top block's LoRA moved
    for mode, model_dir in (("kwise", "model"), ("pairwise", "model_pairwise")):
        loaded = RewardModel.load(out / model_dir)
        assert loaded.layer == -1 and loaded.pooling == cfg.reward.pooling
        rows = tables["comparisons_heldout_trainlabelers.jsonl"]
        expected = comparison_predictions(loaded, rows, "held-out prompts / training labelers")
        saved = predictions[(predictions["mode"] == mode) & (predictions["set"] == "held-out prompts / training labelers")]
        torch.testing.assert_close(torch.tensor(saved[["score_chosen", "score_rejected"]].to_numpy()),
                                   torch.tensor(expected[["score_chosen", "score_rejected"]].to_numpy()),
                                   atol=1e-4, rtol=0)
