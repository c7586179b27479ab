"""Every knob of every stage, as plain data: one dataclass per TOML section, each field saying what it is."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PRESETS = ("micro", "tiny", "small", "medium", "large")


class ConfigError(ValueError):
    """A preset file has an unknown key or a bad value."""


def _knob(default: Any, doc: str, *, low: float | None = None, high: float | None = None) -> Any:
    """A dataclass field with a docstring and an optional inclusive numeric range."""
    meta = {"doc": doc, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _knob("micro", "Registry name of the base model (see rlhf_lib.models.REGISTRY) or a Hub id.")
    reward_model_name: str = _knob("", "Base of the reward model; empty means the same as `name`.")
    device: Literal["auto", "cpu", "cuda"] = _knob("auto", "auto: cuda when present, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _knob(
        "auto", "auto: float32 on CPU (no fast bf16 here), bfloat16 on a GPU that supports it."
    )
    quantize_4bit: bool = _knob(False, "Load the frozen base in 4-bit nf4 (bitsandbytes) and train LoRA on top (QLoRA).")
    finetune: Literal["lora", "full"] = _knob("lora", "lora: train adapters only; full: train every weight (tiny models).")
    lora_rank: int = _knob(16, "LoRA rank r.", low=1, high=1024)
    lora_alpha: int = _knob(32, "LoRA scaling alpha (effective scale alpha / r).", low=1, high=4096)
    lora_dropout: float = _knob(0.0, "Dropout inside LoRA layers (0: PPO wants no dropout).", low=0.0, high=0.9)
    lora_target_modules: list = _knob(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that receive LoRA adapters.",
    )
    gradient_checkpointing: bool = _knob(False, "Trade compute for memory in training stages.")


@dataclass
class DataConfig:
    sft_prompts: int = _knob(64, "Number of demonstrations (prompt, human response) for SFT. Paper: ~13k.", low=1)
    rm_prompts: int = _knob(32, "Number of prompts whose K completions are ranked for the RM. Paper: ~33k.", low=1)
    ppo_prompts: int = _knob(32, "Number of prompts for PPO rollouts. Paper: ~31k.", low=1)
    eval_prompts: int = _knob(32, "Held-out prompts for the preference evaluation.", low=1)
    validation_fraction: float = _knob(0.1, "Share of SFT demonstrations held out for validation.", low=0.0, high=0.5)
    pretrain_docs: int = _knob(64, "Paragraphs of real prose for PPO-ptx and the LM-loss alignment tax.", low=1)
    truthfulqa_questions: int = _knob(32, "TruthfulQA questions evaluated (of 299 offline).", low=1, high=817)
    toxicity_prompts: int = _knob(32, "Toxicity probe prompts evaluated.", low=1)
    squad_questions: int = _knob(32, "Few-shot SQuAD questions for the alignment tax.", low=1)
    max_prompt_tokens: int = _knob(256, "Prompts longer than this (in tokens) are dropped.", low=8)
    max_response_tokens: int = _knob(64, "Demonstration responses are truncated to this many tokens.", low=1)
    near_duplicate_prefix_chars: int = _knob(
        60, "Prompts sharing this many leading characters count as duplicates across splits.", low=8
    )


@dataclass
class GenerationConfig:
    max_new_tokens: int = _knob(32, "Tokens sampled per completion.", low=1)
    temperature: float = _knob(1.0, "Sampling temperature (the paper's rollouts use 1).", low=0.0, high=5.0)
    top_p: float = _knob(1.0, "Nucleus sampling mass.", low=0.0, high=1.0)
    batch_size: int = _knob(8, "Prompts per batch of the reference sampler and of scoring forwards.", low=1)
    prefill_tokens: int = _knob(
        512, "Token budget of one chunk of prompts read before decoding (rows x longest prompt; prompts of similar "
        "length go together).", low=1
    )
    decode_batch_size: int = _knob(
        64, "Rows decoded together after their prompts are read: each new token costs one read of the weights for "
        "all of them (bench/bench_generation.py).", low=1
    )


@dataclass
class SFTConfig:
    epochs: int = _knob(2, "Epochs over the demonstrations. Paper: 16.", low=1)
    learning_rate: float = _knob(2e-4, "Peak LR. Paper: 9.65e-6 (full fine-tune); LoRA wants more.", low=0.0, high=1.0)
    min_lr_ratio: float = _knob(0.1, "Cosine decay ends at this share of the peak LR (paper: 10%).", low=0.0, high=1.0)
    warmup_ratio: float = _knob(0.0, "Share of steps for LR warm-up (paper: none).", low=0.0, high=0.5)
    adam_beta1: float = _knob(0.9, "Adam beta1 (paper 0.9).", low=0.0, high=1.0)
    adam_beta2: float = _knob(0.95, "Adam beta2 (paper 0.95).", low=0.0, high=1.0)
    weight_decay: float = _knob(0.0, "AdamW weight decay.", low=0.0, high=1.0)
    residual_dropout: float = _knob(0.0, "Residual/attention dropout during SFT (paper 0.2).", low=0.0, high=0.9)
    batch_size: int = _knob(8, "Sequences per optimizer step (per device x accumulation).", low=1)
    grad_accum: int = _knob(1, "Gradient accumulation steps.", low=1)
    max_seq_tokens: int = _knob(320, "Prompt + response tokens per training sequence.", low=16)
    fused_lm_head: bool = _knob(
        False, "TRL's fused LM head for the loss: never holds the [tokens, vocabulary] logits (less memory, for GPUs "
        "and large vocabularies). Off: the LM head only at the labelled positions, with a plain log-softmax "
        "(rlhf_lib.sft.train.labelled_token_loss), 1.76x faster per step on the 2-core CPU with the prompt masked "
        "(bench/results/training_bench.md)."
    )
    select_by: Literal["val_loss", "reward"] = _knob(
        "val_loss",
        "Checkpoint criterion: validation loss, or the mean RM score of greedy responses to the validation prompts "
        "(the paper's choice), with this preset's last finished RM from an earlier run.",
    )
    ppo_init_epochs: int = _knob(2, "Epochs of the PPO-initialisation SFT run (paper: 2).", low=1)
    ppo_init_pretrain_mix: float = _knob(
        0.1, "Share of pretraining text mixed into the PPO-initialisation run (paper: 10%).", low=0.0, high=0.9
    )


@dataclass
class LabelerConfig:
    train_labelers: int = _knob(8, "Size of the training-labeler population.", low=2)
    heldout_labelers: int = _knob(4, "Size of the held-out labeler population.", low=2)
    noise_scale: float = _knob(
        0.17, "Thurstone noise std on utilities before calibration; the RM stage recalibrates it on its samples.", low=0.0
    )
    target_agreement: float = _knob(0.726, "Inter-labeler agreement to calibrate to (paper 72.6 +- 1.5%).", low=0.5, high=1.0)
    k_min: int = _knob(4, "Fewest completions ranked per prompt (paper 4).", low=2, high=9)
    k_max: int = _knob(9, "Most completions ranked per prompt (paper 9).", low=2, high=9)
    labelers_per_prompt: int = _knob(
        1, "Labelers who each rank every prompt's K completions, with their own noise (paper: 1; more gives the RM "
        "more comparisons for the same sampling cost, and says so as a deviation).", low=1,
    )


@dataclass
class RewardConfig:
    epochs: int = _knob(1, "Epochs over the comparisons (paper: 1; more overfits).", low=1)
    learning_rate: float = _knob(1e-4, "Peak LR (paper 9e-6 full fine-tune).", low=0.0, high=1.0)
    batch_prompts: int = _knob(4, "Prompts per batch; each carries all C(K,2) of its pairs (paper 64).", low=1)
    max_seq_tokens: int = _knob(320, "Prompt + completion tokens scored by the RM.", low=16)
    forward_batch: int = _knob(
        16, "Most sequences per forward pass in RM training (memory only: losses accumulate to the same gradient).", low=2
    )
    heldout_fraction: float = _knob(0.2, "Share of RM prompts held out to measure accuracy.", low=0.0, high=0.5)
    sft_share: float = _knob(0.5, "Share of the K completions sampled from SFT (the rest from the base).", low=0.0, high=1.0)
    temperatures: list = _knob(
        [1.0], "Sampling temperatures of the K completions, cycled within each prompt (diversity within a prompt).",
    )
    method: Literal["lora", "cached_head", "cached_blocks"] = _knob(
        "lora",
        "lora: LoRA on the SFT model + scalar head, trained end to end (GPU presets). cached_head: the SFT model is "
        "run once per completion and frozen; the scalar head is trained for many epochs on its cached last hidden "
        "states, with early stopping on a validation split of the training prompts (CPU presets). cached_blocks: the "
        "SFT model's lower blocks run once per completion; the top `train_blocks` blocks' LoRA and the head train on "
        "the cached states entering them (rlhf_lib.reward.blocks), with early stopping on the same validation split.",
    )
    pooling: Literal["last", "mean_response"] = _knob(
        "last",
        "What the RM's head reads: the final token's hidden state (last, the usual RM) or the mean of the response "
        "tokens' hidden states (mean_response).",
    )
    feature_layers: list = _knob(
        [1.0],
        "Depths (fractions of the model's blocks; 1.0 = the last) whose hidden states the head may read. cached_head "
        "tries each and keeps the best on the validation split; lora uses the last entry.",
    )
    head_max_epochs: int = _knob(200, "cached_head: most epochs over the cached features.", low=1)
    head_patience: int = _knob(20, "cached_head: stop after this many epochs without a better validation loss.", low=1)
    head_learning_rate: float = _knob(3e-3, "cached_head: Adam learning rate of the head.", low=0.0, high=1.0)
    head_weight_decays: list = _knob(
        [0.01, 0.1, 1.0, 10.0],
        "cached_head: L2 strengths (on standardised features) tried with each layer; the (layer, L2) pair with the best "
        "validation loss is refitted on all training prompts.",
    )
    validation_fraction: float = _knob(
        0.2, "cached_head: share of the training prompts held out for early stopping and the L2 choice.", low=0.05, high=0.5
    )
    train_blocks: int = _knob(2, "cached_blocks: how many of the top transformer blocks train (their LoRA).", low=1)
    block_learning_rate: float = _knob(3e-4, "cached_blocks: Adam learning rate of the top blocks' LoRA and the head.",
                                       low=0.0, high=1.0)
    block_max_epochs: int = _knob(8, "cached_blocks: most epochs over the training comparisons.", low=1)
    block_patience: int = _knob(2, "cached_blocks: stop after this many epochs without a better validation loss.", low=1)


@dataclass
class PPOConfig:
    iterations: int = _knob(4, "Rollout-then-update iterations.", low=1)
    rollout_batch: int = _knob(8, "Episodes (prompts) per iteration (paper 512).", low=1)
    minibatch: int = _knob(4, "Episodes per gradient step (paper 64).", low=1)
    ppo_epochs: int = _knob(4, "Passes over each rollout batch (paper 1; later reproductions 4).", low=1)
    learning_rate: float = _knob(1e-5, "Constant LR after warm-up (the policy's; the value's too unless set below).", low=0.0, high=1.0)
    value_learning_rate: float = _knob(
        0.0, "LR of the value function (adapter + head); 0 = learning_rate. Later RLHF code often trains the critic "
        "faster than the policy.", low=0.0, high=1.0,
    )
    warmup_iterations: int = _knob(1, "Linear LR warm-up iterations (paper 10).", low=0)
    value_warmup_iterations: int = _knob(
        0, "Iterations at the start in which only the value function learns (policy and ptx frozen), so that the "
        "RM-initialised critic fits the SFT policy's returns before its advantages steer the policy (not in the "
        "paper; later RLHF code calls it critic warm-up).", low=0,
    )
    kl_beta: float = _knob(0.02, "Per-token KL penalty coefficient beta (paper 0.02).", low=0.0)
    adaptive_kl: bool = _knob(
        False, "Adapt beta towards target_kl (Ziegler et al. 2019): beta rises while the rollouts' mean sequence KL "
        "is above the target and falls while it is below."
    )
    target_kl: float = _knob(6.0, "Target mean sequence KL (nats) for the adaptive controller.", low=0.0)
    kl_horizon: int = _knob(
        10_000, "Adaptive controller's horizon in episodes (Ziegler et al.: 10,000): each iteration beta is "
        "multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * rollout_batch / kl_horizon, so a run of E episodes "
        "can move beta by at most a factor of about exp(0.2 * E / kl_horizon).", low=1,
    )
    gamma: float = _knob(1.0, "Discount (paper 1).", low=0.0, high=1.0)
    gae_lambda: float = _knob(0.95, "GAE lambda.", low=0.0, high=1.0)
    clip_range: float = _knob(0.2, "Policy ratio clip epsilon.", low=0.0, high=1.0)
    value_clip_range: float = _knob(0.2, "Value clip range.", low=0.0)
    value_loss_coef: float = _knob(0.1, "Weight of the value loss.", low=0.0)
    max_grad_norm: float = _knob(1.0, "Gradient-norm clip.", low=0.0)
    missing_eos_penalty: float = _knob(
        1.0, "Subtracted from the RM score when a response has no EOS, in units of the RM's score std on SFT samples "
        "(`sft_score_std` in the RM directory's meta.json; 1.0 with a warning when absent), so it weighs the same "
        "against the RM's spread whatever the RM's scale.", low=0.0,
    )
    ptx_coef: float = _knob(
        27.8, "PPO-ptx gamma: weight of the pretraining LM loss in the PPO-ptx run (paper 27.8); plain PPO uses 0.", low=0.0
    )
    ptx_batch: int = _knob(4, "Pretraining sequences per gradient step for PPO-ptx.", low=1)
    ema_decay: float = _knob(0.0, "EMA of policy weights (paper 0.992; 0 = off).", low=0.0, high=1.0)
    max_kl: float = _knob(50.0, "Divergence guard: stop if mean sequence KL exceeds this.", low=0.0)
    min_entropy: float = _knob(0.01, "Divergence guard: stop if mean token entropy falls below this.", low=0.0)
    whiten_rewards: bool = _knob(False, "Whiten rewards before GAE (off in the paper).")
    forward_tokens: int = _knob(
        16384, "Token budget of one chunk of the rollout's reference, value and reward forwards (rows x longest "
        "sequence; rows of similar length go together, bench/bench_rollout.py).", low=1
    )
    logprobs_from_sampler: bool = _knob(
        False, "Take the rollout's old log-probs and entropies from the sampler (cached decoding with the policy's "
        "LoRA merged), as TRL's PPOTrainer does, instead of a forward over the sampled text: one forward fewer per "
        "rollout. The two differ by rounding only (~1e-5 in fp32, tested; more in bf16), so the first minibatch's "
        "ratio is 1 up to that rounding instead of exactly. Off = the recomputed, exact log-probs.",
    )
    collapse_fraction: float = _knob(
        0.5, "Collapse guard: fires when an iteration's mean response length or mean token entropy falls below this "
        "share of its value on the first rollout (before any policy update). The same share of the first "
        "validation's length bars a validation point from checkpoint selection. 0 = off.", low=0.0, high=1.0,
    )
    collapse_action: Literal["stop", "flag"] = _knob(
        "stop", "What the collapse guard does: stop = end training cleanly at that iteration, before its update "
        "(everything written so far is kept, the reason goes into result.json, a warning is raised); flag = keep "
        "training and mark the iteration in metrics.csv's `collapsed` column (always written).",
    )
    validation_prompts: int = _knob(
        0, "PPO prompts held out from rollouts (a seeded choice) to choose the exported checkpoint by the mean "
        "reward of greedy responses (RM score minus the missing-EOS penalty), as the paper chose by RM score on a "
        "validation set. 0 = off: the last iterate is exported.", low=0,
    )
    validation_every: int = _knob(
        5, "Iterations between validations (also at iteration 0, before any update, and at the last iteration).", low=1
    )


@dataclass
class EvalConfig:
    bootstrap_samples: int = _knob(1000, "Bootstrap resamples for 95% intervals.", low=10)
    best_of_n: int = _knob(
        4, "n for best-of-n against the RM: n SFT samples at generation.temperature, the RM's favourite kept.", low=1
    )
    few_shot_examples: int = _knob(2, "Shots in the few-shot prompts (GPT prompted, SQuAD).", low=0)
    temperature: float = _knob(
        0.0, "Decoding temperature of evaluation outputs: 0 = greedy (deterministic, the default); > 0 samples, seeded.",
        low=0.0, high=5.0,
    )
    max_items: int = _knob(
        0, "Cap on items per benchmark in the analysis (TruthfulQA questions, toxicity prompts, SQuAD questions, "
        "held-out documents) to bound CPU time; 0 = all that the data stage provides.", low=0,
    )
    probe_max_new_tokens: int = _knob(
        0, "New tokens for TruthfulQA answers and toxicity continuations; 0 = generation.max_new_tokens.", low=0
    )
    dpo_beta: float = _knob(0.1, "DPO beta.", low=0.0)
    dpo_epochs: int = _knob(1, "DPO epochs over the RM comparisons.", low=1)
    dpo_learning_rate: float = _knob(5e-5, "DPO learning rate.", low=0.0, high=1.0)
    dpo_pairs_per_prompt: int = _knob(
        1, "DPO pairs per ranked prompt: best vs worst first, then the next widest rank gaps (CPU cost bound).",
        low=1, high=36,
    )
    dpo_batch_size: int = _knob(4, "Preference pairs per DPO optimizer step.", low=1)


@dataclass
class TrackingConfig:
    report_to: Literal["tensorboard", "wandb", "mlflow", "trackio", "none"] = _knob(
        "tensorboard",
        "Where every stage logs its training curves (rlhf_lib.tracking): TRL's trainers (SFT, DPO) and our loops (RM, "
        "PPO) alike. tensorboard writes event files inside each stage's folder (`tensorboard --logdir runs/<preset>`); "
        "wandb, mlflow and trackio need their package installed and configured. Not part of any stage's fingerprint.",
    )
    run_name: str = _knob("", "The run's name on the dashboard (default: <preset>-seed<seed>); each stage logs under it.")
    project: str = _knob("instructgpt-study", "Project (wandb, trackio) or experiment (mlflow) the runs are grouped in.")


@dataclass
class StudyConfig:
    preset: str = _knob("micro", "Name of the preset (the file stem).")
    seed: int = _knob(0, "Seed for every random choice of the study.", low=0)
    description: str = _knob("", "What this preset is for.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    labelers: LabelerConfig = field(default_factory=LabelerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # where curves go; no stage depends on it

    # Which config sections each stage's artifacts depend on (its own and everything upstream).
    STAGE_SECTIONS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("seed", "model", "data"),
        "sft": ("seed", "model", "data", "sft", "generation"),
        "reward": ("seed", "model", "data", "sft", "generation", "labelers", "reward"),
        "ppo": ("seed", "model", "data", "sft", "generation", "labelers", "reward", "ppo"),
        "analysis": ("seed", "model", "data", "sft", "generation", "labelers", "reward", "ppo", "evaluation"),
    }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, stage: str) -> str:
        """Short hash of every setting that the artifacts of `stage` depend on."""
        full = self.to_dict()
        relevant = {key: full[key] for key in self.STAGE_SECTIONS[stage]}
        blob = json.dumps(relevant, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
