"""Export a finished study in the formats the RLHF ecosystem reads: transformers checkpoints, a datasets
dataset, model cards, and (behind a flag) the Hugging Face Hub.

    python -m rlhf_lib.export --size tiny --out exports/tiny
    python -m rlhf_lib.export --size micro --runs-dir /tmp/runs --out /tmp/export   # runs/ as run_all.py's
    python -m rlhf_lib.export --size tiny --out exports/tiny --push-to-hub me/instructgpt-tiny  # off by default

What DIR receives (each folder with a README.md model or dataset card):

    sft/ ppo/ ppo_ptx/      the policies with their LoRA merged (`merge_and_unload`): plain
                            `AutoModelForCausalLM.from_pretrained(DIR/sft)` and its tokenizer
    reward_model/           the RM as `AutoModelForSequenceClassification`, when its form lets the standard class
                            give our scores (see `reward_export_plan`); otherwise reward_model_rlhf_format/ (our
                            own format, `RewardModel.load`) with a card that says why
    comparisons/            the labelers' rankings: config `pairs` (prompt / chosen / rejected, TRL's preference
                            format, one row per untied pair) and config `rankings` (the K-wise rankings), as
                            `save_to_disk` folders under arrow/ and as JSONL
    export.json             what was exported, refused or skipped, and why

The reward model. Ours scores head(pooled hidden state of block `layer`) + head bias - normalisation bias.
A standard `*ForSequenceClassification` scores `score(final_norm(last block))` at the last non-pad token, with
no bias. So:
- last-token pooling at the final layer (the study's hidden_states[-1] is after the final norm): the head
  becomes `score`; the constant (head bias - normalisation bias) has no place in the class and is written to
  config.json as `rlhf_score_offset`: logits + offset = our score; differences between answers are equal as is.
- last-token pooling at an earlier block L (hidden_states[L]: block L's output, no norm): a Llama body cut to
  L blocks, widened by n_heads residual coordinates, the last of which block L's MLP bias sets to a large constant C. The final
  RMSNorm then divides by ~C/sqrt(d+1) whatever the other coordinates hold, and its weights undo that: it
  passes block L's state through unchanged (to float32 rounding) and outputs 1 in the extra coordinate, where
  `score` keeps the bias. Logits equal our score, bias included. Float32 only (C overflows float16).
- mean pooling over response tokens: no standard class averages over a span it cannot see; refused, with
  our format copied and a card that says what to do.

Scoring text with the exported RM: the same text as the study's RM reads (`reward_text`): the prompt in the
study's format, the answer, and EOS only when the answer ended with one (a truncated answer gets none);
tokenised with add_special_tokens=False, padded on the RIGHT (positions then count from each row's start,
as ours do), cut from the left at `model_max_length`. The exported tokenizer is set up that way.

Modules, one concern each: common (folder names, config.json keys, ExportRefused, what the study holds),
policies (merged causal LMs), reward_model (the sequence-classification export and its exactness rules),
comparisons (the datasets export), cards (model and dataset cards), command (export_study, push_to_hub, main).
"""


from rlhf_lib.export.cards import (
    LIMITS,
    POLICY_METHODS,
    REWARD_METHODS,
    bigbench_canary,
    comparisons_card,
    data_section,
    findings_section,
    front_matter,
    limits_section,
    policy_card,
    ppo_selection,
    provenance_section,
    reward_card,
)
from rlhf_lib.export.command import (
    export_study,
    hub_repo_ids,
    main,
    parse_args,
    push_exports,
    push_to_hub,
)
from rlhf_lib.export.common import (
    COMPARISONS_DIR,
    HUB_SUFFIXES,
    NORM_NEUTRALISING_CONSTANT,
    POLICIES,
    POLICY_TITLES,
    REPO,
    REWARD_DIR,
    REWARD_INPUT_KEY,
    REWARD_OWN_FORMAT_DIR,
    SCORE_OFFSET_KEY,
    ExportRefused,
    StudyContext,
    study_context,
)
from rlhf_lib.export.comparisons import (
    comparison_splits,
    export_comparisons,
    preference_pairs,
)
from rlhf_lib.export.policies import (
    export_policy,
    merged_policy,
    with_saved_settings,
)
from rlhf_lib.export.reward_model import (
    RewardPlan,
    block_classifier,
    export_reward_model,
    exported_scores,
    final_layer_classifier,
    reward_export_plan,
    reward_text,
    reward_tokenizer,
)

__all__ = [
    "COMPARISONS_DIR", "ExportRefused", "HUB_SUFFIXES", "LIMITS", "NORM_NEUTRALISING_CONSTANT", "POLICIES",
    "POLICY_METHODS", "POLICY_TITLES", "REPO", "REWARD_DIR", "REWARD_INPUT_KEY", "REWARD_METHODS",
    "REWARD_OWN_FORMAT_DIR", "RewardPlan", "SCORE_OFFSET_KEY", "StudyContext", "bigbench_canary",
    "block_classifier", "comparison_splits", "comparisons_card", "data_section", "export_comparisons",
    "export_policy", "export_reward_model", "export_study", "exported_scores", "final_layer_classifier",
    "findings_section", "front_matter", "hub_repo_ids", "limits_section", "main", "merged_policy",
    "parse_args", "policy_card", "ppo_selection", "preference_pairs", "provenance_section", "push_exports",
    "push_to_hub", "reward_card", "reward_export_plan", "reward_text", "reward_tokenizer", "study_context",
    "with_saved_settings",
]
