"""Step 1 of InstructGPT: supervised fine-tuning on human-written demonstrations (TRL's SFTTrainer).

Loss is on the response tokens only (prompt-completion data, `completion_only_loss`); LoRA adapters
by default, QLoRA when the preset sets `model.quantize_4bit`, full fine-tuning with
`model.finetune = "full"`. Cosine decay to `sft.min_lr_ratio` of the peak LR, Adam betas
(0.9, 0.95) as in the paper. Two products, as in the paper:

- the SFT policy: `sft.epochs` epochs, the epoch checkpoint with the best validation criterion;
- the PPO initialisation: `sft.ppo_init_epochs` epochs with `sft.ppo_init_pretrain_mix` of
  pretraining text mixed in.

    from rlhf_lib.sft import train_sft, load_policy
    result = train_sft(cfg, demos, val_demos, out_dir)      # demos: [(prompt, response), ...]
    model, tokenizer = load_policy(result.adapter_dir)

An interrupted training resumes: the Trainer's epoch checkpoints are kept in a work folder
(`checkpoint_dir`; the stage's is runs/<preset>/work-sft-<fingerprint>/, outside the partial stage
directory that a later run removes), each marked complete only once every file of it is on disk, and a
rerun continues from the newest complete one. A checkpoint cut off while being written is skipped with a
warning (the previous one, or a fresh start, is used instead).

Modules: train (demonstrations as a dataset, TRL's arguments, train_sft, loss curves), checkpoints (marked complete,
resumed after an interruption, the one to keep chosen and exported), stage (notebook 02's stage: the policy and
the PPO-ptx init, published whole).
"""

from rlhf_lib.artifacts import base_weights, load_policy  # their old path: rlhf_lib.sft
from rlhf_lib.sft.checkpoints import (
    CHECKPOINT_COMPLETE,
    META,
    checkpoint_problem,
    checkpoint_rewards,
    completion_marking_callback,
    latest_reward_model,
    mark_checkpoint_complete,
    resumable_checkpoint,
)
from rlhf_lib.sft.stage import (
    run_sft_stage,
    sft_work_dir,
)
from rlhf_lib.sft.train import (
    SFTResult,
    demonstrations_dataset,
    loss_curves,
    pretraining_rows,
    train_sft,
    trl_common_args,
)

__all__ = [
    "CHECKPOINT_COMPLETE", "META", "SFTResult", "base_weights", "checkpoint_problem", "checkpoint_rewards",
    "completion_marking_callback", "demonstrations_dataset", "latest_reward_model", "load_policy",
    "loss_curves", "mark_checkpoint_complete", "pretraining_rows", "resumable_checkpoint", "run_sft_stage",
    "sft_work_dir", "train_sft", "trl_common_args",
]
