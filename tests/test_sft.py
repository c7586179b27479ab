"""SFT on the micro model: response-only loss, falling loss, adapter round trip, QLoRA."""

import pytest
import torch

from rlhf_lib.config import load_preset
from rlhf_lib.generation import generate
from rlhf_lib.prompting import format_prompt
from rlhf_lib.sft import demonstrations_dataset, load_policy, loss_curves, train_sft

PAIRS = [
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is two plus two?", "Two plus two is four."),
    ("Say hello in French.", "Bonjour."),
    ("Give an antonym of hot.", "Cold is an antonym of hot."),
]


def _cfg(**overrides):
    return load_preset("micro", {"sft.epochs": 6, "sft.batch_size": 4, "sft.learning_rate": 3e-3, **overrides})


def test_only_response_tokens_carry_loss(micro_tokenizer):
    from trl import SFTConfig, SFTTrainer

    from rlhf_lib import models

    dataset = demonstrations_dataset(micro_tokenizer, PAIRS[:1])
    args = SFTConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True, bf16=False, completion_only_loss=True)
    trainer = SFTTrainer(model=models.load_causal_lm("micro"), args=args, train_dataset=dataset,
                         processing_class=micro_tokenizer)
    row = trainer.train_dataset[0]
    prompt_ids = micro_tokenizer(format_prompt(micro_tokenizer, PAIRS[0][0]), add_special_tokens=False)["input_ids"]
    batch = trainer.data_collator([row])
    labels = batch["labels"][0]
    assert (labels[: len(prompt_ids)] == -100).all(), "prompt tokens must not carry loss"
    supervised = micro_tokenizer.decode(labels[labels != -100])
    assert supervised == PAIRS[0][1] + micro_tokenizer.eos_token


def test_full_finetune_overfits_a_tiny_set(tmp_path):
    cfg = _cfg(**{"model.finetune": "full", "sft.epochs": 10, "sft.learning_rate": 2e-2})
    result = train_sft(cfg, PAIRS, PAIRS[:2], tmp_path / "full", progress=False)
    train = loss_curves(result.log_history).query("split == 'train'")["loss"].to_numpy()
    assert train[-1] < 0.6 * train[0], f"training loss did not fall: {train}"
    model, _ = load_policy(result.adapter_dir)
    assert sum(p.numel() for p in model.parameters()) > 3_000_000


def test_lora_loss_falls_and_adapter_roundtrips(tmp_path, micro_tokenizer):
    cfg = _cfg()
    result = train_sft(cfg, PAIRS, PAIRS[:2], tmp_path / "sft", progress=False)
    curves = loss_curves(result.log_history)
    train = curves[curves.split == "train"]["loss"].to_numpy()
    assert train[-1] < train[0] - 0.1, f"training loss did not fall: {train}"
    assert (curves.split == "validation").sum() == cfg.sft.epochs
    assert (result.adapter_dir / "adapter_model.safetensors").exists()

    model_a, tok = load_policy(result.adapter_dir)
    model_b, _ = load_policy(result.adapter_dir)
    prompts = [format_prompt(tok, p) for p, _ in PAIRS]
    ids = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(model_a(**ids).logits, model_b(**ids).logits)
    greedy_a = generate(model_a, tok, prompts, max_new_tokens=6, temperature=0.0).texts
    greedy_b = generate(model_b, tok, prompts, max_new_tokens=6, temperature=0.0).texts
    assert greedy_a == greedy_b


def test_best_epoch_chosen_by_validation_loss(tmp_path):
    result = train_sft(_cfg(), PAIRS, PAIRS[2:], tmp_path / "sft", progress=False)
    evals = result.log_history.dropna(subset=["eval_loss"])
    assert result.chosen_epoch == float(evals.loc[evals["eval_loss"].idxmin(), "epoch"])


def test_pretraining_mix_adds_prose_rows(tmp_path):
    result = train_sft(_cfg(**{"sft.epochs": 1}), PAIRS, [], tmp_path / "init", epochs=1,
                       pretrain_texts=["Some real prose about rivers and hills."], pretrain_mix=0.5, progress=False)
    # 4 demonstrations + 4 prose rows at a 50% mix, batch 4 -> 2 optimizer steps in one epoch
    assert int(result.log_history["step"].max()) == 2


@pytest.mark.slow
def test_qlora_step_runs(tmp_path):
    cfg = _cfg(**{"model.quantize_4bit": True, "sft.epochs": 1})
    result = train_sft(cfg, PAIRS, [], tmp_path / "qlora", progress=False)
    assert result.log_history["loss"].dropna().notna().all()
    model, _ = load_policy(result.adapter_dir)
    assert "4bit" in type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__


def test_checkpoint_chosen_by_reward_model_score(tmp_path):
    import json

    import pandas as pd

    from rlhf_lib.reward import new_reward_model

    cfg = _cfg(**{"sft.epochs": 3, "sft.select_by": "reward", "generation.max_new_tokens": 4})
    with pytest.raises(ValueError, match="reward model"):
        train_sft(cfg, PAIRS, PAIRS[2:], tmp_path / "no-rm", progress=False)
    rm = new_reward_model(cfg)  # untrained, but a fixed scorer is all the selection needs
    rm.save(tmp_path / "rm")
    result = train_sft(cfg, PAIRS, PAIRS[2:], tmp_path / "sft", progress=False, reward_model_dir=tmp_path / "rm")
    scores = pd.read_csv(tmp_path / "sft" / "checkpoint_rewards.csv")
    assert len(scores) == 3 and (scores["prompts"] == 2).all()
    assert result.chosen_epoch == scores.loc[scores["mean_reward"].idxmax(), "epoch"]
    meta = json.loads((result.adapter_dir / "meta.json").read_text())
    assert meta["selected_by"] == "reward" and meta["mean_reward"] == pytest.approx(scores["mean_reward"].max())
