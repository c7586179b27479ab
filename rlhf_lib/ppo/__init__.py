"""PPO and PPO-ptx as in InstructGPT (Ouyang et al. 2022, appendix C.4), one module per part of the algorithm.

    core        the math, pure tensor functions in the paper's order: masked statistics, log-probabilities,
                per-token KL rewards, GAE, clipped policy and value losses, the KL controller, the LR schedule
    roles       one frozen base carrying the policy, reference, value and reward as LoRA adapters
    rollout     steps 1-6: sample, log-probabilities and values, score, rewards and advantages
    update      steps 7-8: PPO epochs over minibatches (+ the ptx term), per-group gradient clipping, EMA
    checkpoint  the resumable state of a run (weights, optimizer, EMA, counters)
    selection   the collapse guard and the choice of the exported checkpoint from validation points
    outputs     what a run writes: metrics.csv, samples.jsonl, the tracker's curves; the exported policy and value
    trainer     `train_ppo`: the loop, step 9, resuming, validation and the guards
    stage       `run_ppo_stage`: PPO and PPO-ptx for notebook 04 and run_all

Usage::

    from rlhf_lib.ppo import train_ppo
    result = train_ppo(cfg, sft_dir, rm_dir, prompts, pretrain_texts, out_dir, ptx=False)

Every name below is importable from `rlhf_lib.ppo`. The training-log readers of notebook 04 live in
`rlhf_lib.evaluation.ppo_logs`; `rlhf_lib.ppo.score_trend` and friends still resolve there, lazily.
"""

from __future__ import annotations

from typing import Any

from rlhf_lib.ppo.checkpoint import (
    CHECKPOINT_PREFIX,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rlhf_lib.ppo.core import (
    KL_HORIZON,
    KLController,
    explained_variance,
    gae,
    learning_rate_at,
    logprobs_and_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from rlhf_lib.ppo.outputs import METRIC_COLUMNS, RunLog, export_run
from rlhf_lib.ppo.roles import PolicyValueRoles, RewardFn, build_roles, lm_loss, response_logprobs
from rlhf_lib.ppo.rollout import (
    PretrainSampler,
    Rollout,
    collect_rollout,
    distinct_fraction,
    effective_missing_eos_penalty,
    trim_left_padding,
    validate_policy,
)
from rlhf_lib.ppo.selection import (
    VALIDATION_COLUMNS,
    VALIDATION_MIN_DISTINCT,
    ValidationTracker,
    collapse_reason,
    select_checkpoint,
    split_validation_prompts,
    validation_block_reason,
)
from rlhf_lib.ppo.stage import run_ppo_stage
from rlhf_lib.ppo.trainer import PPODivergence, PPOResult, iteration_prompts, train_ppo
from rlhf_lib.ppo.update import ADAM_EPS, EMA, build_optimizer, clip_gradients, ppo_update

# Moved to rlhf_lib.evaluation.ppo_logs (they read a finished run's files; they do not train). Resolved on
# first use so that importing rlhf_lib.ppo does not import the evaluation package.
_MOVED_TO_EVALUATION = ("guard_and_selection", "response_diversity", "score_trend")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_EVALUATION:
        from rlhf_lib.evaluation import ppo_logs

        return getattr(ppo_logs, name)
    raise AttributeError(f"module 'rlhf_lib.ppo' has no attribute {name!r}")


__all__ = [
    "ADAM_EPS",
    "CHECKPOINT_PREFIX",
    "EMA",
    "KLController",
    "KL_HORIZON",
    "METRIC_COLUMNS",
    "PPODivergence",
    "PPOResult",
    "PolicyValueRoles",
    "PretrainSampler",
    "RewardFn",
    "Rollout",
    "RunLog",
    "TrainState",
    "VALIDATION_COLUMNS",
    "VALIDATION_MIN_DISTINCT",
    "ValidationTracker",
    "build_optimizer",
    "build_roles",
    "clip_gradients",
    "collapse_reason",
    "collect_rollout",
    "distinct_fraction",
    "effective_missing_eos_penalty",
    "explained_variance",
    "export_run",
    "gae",
    "iteration_prompts",
    "latest_checkpoint",
    "learning_rate_at",
    "lm_loss",
    "load_checkpoint",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "ppo_update",
    "response_logprobs",
    "run_ppo_stage",
    "save_checkpoint",
    "select_checkpoint",
    "split_validation_prompts",
    "train_ppo",
    "trim_left_padding",
    "validate_policy",
    "validation_block_reason",
    "value_loss",
]
