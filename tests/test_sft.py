"""SFT on the micro model: response-only loss, falling loss, adapter round trip, QLoRA, resuming after an interruption."""

from pathlib import Path

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


def test_model_loss_trainer_gives_trls_fused_loss(micro_tokenizer, tmp_path):
    """sft.fused_lm_head = false swaps TRL's fused LM head for the model's own loss: the same number, faster on CPU."""
    from trl import SFTConfig, SFTTrainer

    from rlhf_lib import models
    from rlhf_lib.sft.train import _model_loss_sft_trainer

    dataset = demonstrations_dataset(micro_tokenizer, PAIRS)
    losses = {}
    for name, trainer_class in (("fused", SFTTrainer), ("model", _model_loss_sft_trainer())):
        torch.manual_seed(0)
        model = models.load_causal_lm("micro", dtype="float32")
        args = SFTConfig(output_dir=str(tmp_path / name), report_to="none", bf16=False, completion_only_loss=True,
                         per_device_eval_batch_size=2)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                processing_class=micro_tokenizer)
        losses[name] = trainer.evaluate()["eval_loss"]
    assert losses["model"] == pytest.approx(losses["fused"], rel=1e-5)
    assert losses["model"] > 1.0  # a random model's loss: the comparison is not between two zeros


def test_labelled_token_loss_is_the_models_loss_and_gradient(micro_lora):
    """The head applied at labelled positions only: the model's own loss and LoRA gradients, with padding, a prompt
    masked out, and with and without the Trainer's token count."""
    from rlhf_lib import models
    from rlhf_lib.sft.train import labelled_token_loss

    model = micro_lora
    assert models.logits_are_head_output(model)
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(1)).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    for count in (torch.tensor(11), None):
        losses, grads = [], []
        for ours in (False, True):
            model.zero_grad()
            if ours:
                loss = labelled_token_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, count)
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[0] > 1.0
        assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7) and grads[0].abs().max() > 0


def test_a_logit_transform_keeps_the_models_own_loss():
    """gemma 2's tanh cap changes the logits after the head: such a model must not take labelled_token_loss."""
    from rlhf_lib import models

    model = models.load_causal_lm("micro", dtype="float32")
    model.config.final_logit_softcapping = 30.0
    assert not models.logits_are_head_output(model)


def test_model_loss_trainer_trains_as_trls(micro_tokenizer, tmp_path):
    """The training loss of one step through labelled_token_loss is TRL's (fused head), and so is the update."""
    from trl import SFTConfig, SFTTrainer

    from rlhf_lib import models
    from rlhf_lib.sft.train import _model_loss_sft_trainer

    dataset = demonstrations_dataset(micro_tokenizer, PAIRS)
    losses, weights = {}, {}
    for name, trainer_class in (("fused", SFTTrainer), ("model", _model_loss_sft_trainer())):
        torch.manual_seed(0)
        model = models.load_causal_lm("micro", dtype="float32")
        args = SFTConfig(output_dir=str(tmp_path / name), report_to="none", bf16=False, completion_only_loss=True,
                         per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, save_strategy="no",
                         logging_steps=1, seed=0, use_cpu=model.device.type == "cpu")
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=micro_tokenizer)
        trainer.train()
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        weights[name] = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    assert len(losses["model"]) == 2 and losses["model"] == pytest.approx(losses["fused"], rel=1e-4)
    assert torch.allclose(weights["model"], weights["fused"], atol=1e-5)


def test_only_response_tokens_carry_loss(micro_tokenizer):
    from trl import SFTConfig, SFTTrainer

    from rlhf_lib import models

    dataset = demonstrations_dataset(micro_tokenizer, PAIRS[:1])
    # CPU on purpose: only the data collator runs here (no forward), so the device is not under test.
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
    assert list((tmp_path / "sft" / "tensorboard").rglob("events.out.tfevents.*"))  # tracking.report_to's default

    model_a, tok = load_policy(result.adapter_dir)
    model_b, _ = load_policy(result.adapter_dir)
    prompts = [format_prompt(tok, p) for p, _ in PAIRS]
    ids = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model_a.device)
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


class _StopAtStep:
    """Raises KeyboardInterrupt at the end of optimizer step `step` (before that step's checkpoint is saved)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt(f"test interruption at step {step}")

        return Stop()


class _StopAfterFirstCheckpoint:
    """Raises KeyboardInterrupt at the end of the first optimizer step after a checkpoint was saved."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            saved = False

            def on_save(self, args, state, control, **kwargs):
                self.saved = True

            def on_step_end(self, args, state, control, **kwargs):
                if self.saved:
                    raise KeyboardInterrupt(f"test interruption at step {state.global_step}")

        return Stop()


class _FirstStep:
    """Records the global step the Trainer starts its first optimizer step from (0, or a resumed checkpoint's)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class First(TrainerCallback):
            started_at: int | None = None

            def on_step_begin(self, args, state, control, **kwargs):
                if self.started_at is None:
                    self.started_at = state.global_step

        return First()


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _interrupted_then_resumed(tmp_path, cfg, stop_at: int, tear=None):
    """Train until KeyboardInterrupt at `stop_at`, optionally damage the checkpoints (`tear`), train again."""
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg, PAIRS, PAIRS[2:], tmp_path / "first", progress=False, checkpoint_dir=work,
                  callbacks=[_StopAtStep(stop_at)])
    if tear:
        tear(work)
    first_step = _FirstStep()
    result = train_sft(cfg, PAIRS, PAIRS[2:], tmp_path / "second", progress=False, checkpoint_dir=work,
                       callbacks=[first_step])
    return result, first_step.started_at


def test_interrupted_sft_resumes_from_its_last_checkpoint(tmp_path, capsys):
    # Dropout on, so the resumed run only matches if the Trainer's RNG state is restored as well.
    # float32 on every device, so that the tolerance below means "last bits"; bf16 (a GPU's "auto") would not.
    cfg = _cfg(**{"sft.epochs": 4, "sft.residual_dropout": 0.1, "model.dtype": "float32"})
    whole = train_sft(cfg, PAIRS, PAIRS[2:], tmp_path / "whole", progress=False, checkpoint_dir=tmp_path / "whole_ckpt")
    # One optimizer step per epoch here (4 rows, batch 4): stopping at the end of step 3 leaves checkpoint-2.
    resumed, started_at = _interrupted_then_resumed(tmp_path, cfg, stop_at=3)
    assert started_at == 2, "training did not continue from the newest checkpoint"
    assert "checkpoint-2 (step 2 of 4), left by an interrupted run" in capsys.readouterr().out  # the user is told
    assert resumed.log_history["step"].max() == whole.log_history["step"].max() == 4
    # The log of the resumed run carries the steps before the interruption too.
    assert resumed.log_history.dropna(subset=["loss"])["step"].tolist() == [1, 2, 3, 4]
    assert resumed.log_history["train_loss"].dropna().item() == pytest.approx(whole.log_history["train_loss"].dropna().item())
    assert resumed.log_history["num_tokens"].tolist() == pytest.approx(whole.log_history["num_tokens"].tolist(), nan_ok=True)
    assert resumed.chosen_epoch == whole.chosen_epoch
    # On CPU the same ops in the same order with the restored RNG give the same weights; a GPU could differ
    # in the last bits (nondeterministic kernels), which is why this is allclose rather than equal.
    expected, actual = _adapter_tensors(whole.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    assert (tmp_path / "work" / "checkpoint-4").is_dir(), "a given checkpoint folder is left to its caller"


def test_torn_checkpoint_is_skipped_with_a_warning(tmp_path):
    from rlhf_lib.sft import CHECKPOINT_COMPLETE

    cfg = _cfg(**{"sft.epochs": 4})

    def tear_newest(work):
        # A kill while the Trainer wrote checkpoint-2: its weights cut short, no completion record.
        weights = work / "checkpoint-2" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        (work / "checkpoint-2" / CHECKPOINT_COMPLETE).unlink()

    with pytest.warns(UserWarning, match="checkpoint-2 is not resumable"):
        result, started_at = _interrupted_then_resumed(tmp_path, cfg, stop_at=3, tear=tear_newest)
    assert started_at == 1, "a torn checkpoint must fall back to the previous complete one"
    assert result.log_history["step"].max() == 4


def test_checkpoint_of_another_setup_is_not_resumed(tmp_path):
    cfg = _cfg(**{"sft.epochs": 2})
    train_sft(cfg, PAIRS, PAIRS[2:], tmp_path / "a", progress=False, checkpoint_dir=tmp_path / "work")
    first_step = _FirstStep()
    with pytest.warns(UserWarning, match="another training set-up"):
        train_sft(cfg, PAIRS[:3], PAIRS[2:], tmp_path / "b", progress=False, checkpoint_dir=tmp_path / "work",
                  callbacks=[first_step])
    assert first_step.started_at == 0


def test_interrupted_sft_stage_resumes_and_cleans_up(tmp_path, bigbench_tasks, monkeypatch):
    """The stage keeps its checkpoints outside the partial directory, resumes from them, removes them once published."""
    from rlhf_lib import sft
    from rlhf_lib.data.study import build_data_stage
    from rlhf_lib.pipeline import RunPaths
    from rlhf_lib.sft import stage as sft_stage  # where run_sft_stage looks train_sft up

    cfg = load_preset("micro", {"sft.epochs": 2, "sft.ppo_init_epochs": 2})
    paths = RunPaths.for_config(cfg, tmp_path / "runs")
    build_data_stage(cfg, paths)
    real_train_sft = sft.train_sft
    started = {}

    def train_sft_stopping_in_ppo_init(*args, **kwargs):
        if Path(kwargs["checkpoint_dir"]).name == "ppo_init":  # the policy is done; stop the PPO init mid-way
            kwargs["callbacks"] = [_StopAfterFirstCheckpoint()]
        return real_train_sft(*args, **kwargs)

    monkeypatch.setattr(sft_stage, "train_sft", train_sft_stopping_in_ppo_init)
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft_stage(cfg, paths, progress=False)
    work = sft.sft_work_dir(paths)
    assert not list(paths.root.glob(".sft-*.partial-*")), "the interrupted stage's partial directory stays behind"
    for product in ("policy", "ppo_init"):
        assert list((work / product).glob(f"checkpoint-*/{sft.CHECKPOINT_COMPLETE}")), f"no complete {product} checkpoint"

    def train_sft_recording_first_step(*args, **kwargs):
        first_step = _FirstStep()
        kwargs["callbacks"] = [first_step]
        result = real_train_sft(*args, **kwargs)
        started[Path(kwargs["checkpoint_dir"]).name] = first_step.started_at
        return result

    monkeypatch.setattr(sft_stage, "train_sft", train_sft_recording_first_step)
    stage = sft.run_sft_stage(cfg, paths, progress=False)
    assert paths.is_done("sft") and (stage / "policy" / "adapter_model.safetensors").exists()
    assert started["policy"] is None, "the finished policy was trained again"  # no optimizer step was left to run
    assert started["ppo_init"] > 0, "the PPO init started over instead of resuming"
    assert not work.exists(), "the work folder outlived the published stage"
