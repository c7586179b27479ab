"""Step 2 of InstructGPT: a reward model trained on K-wise rankings.

The RM is the SFT model (as in the paper) with a scalar head read at the final token. Loss (Ouyang et
al. 2022, eq. 1): all C(K,2) pairs of one prompt's ranking form ONE batch element,

    loss(prompt) = -1/C(K,2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))      (ties dropped)

so pairs of one prompt are never split across batches (the paper found shuffled pairs overfit).
`mode="pairwise"` trains on shuffled independent pairs instead, on the same data: the ablation.
After training, a bias is set so that human-written demonstrations score a mean of 0.

Three ways to train it (`reward.method`):
- `lora` (GPU presets): LoRA adapters of the SFT model and the head, trained end to end.
- `cached_head` (CPU presets): the SFT model stays frozen and runs ONCE per completion; its last hidden
  state at the final token is cached, and the head is fitted on those features for many epochs, with
  early stopping and an L2 strength chosen on a validation split of the training prompts. The saved RM
  is the same format (SFT adapter + head), so PPO reads it the same way.
- `cached_blocks` (opt-in): the states entering the top `reward.train_blocks` blocks are cached once, and those
  blocks' LoRA is trained with the head, K-wise, early-stopped on the same validation split.

The RM scores TEXT as the policy made it: EOS is appended only to answers that ended with EOS, never to
one cut at the token budget. It re-tokenises with its own tokenizer, so one RM can judge other policies.

    from rlhf_lib.reward import RewardModel
    rm = RewardModel.load(paths.reward / "model")
    rm.score_texts(["Name a colour."], ["Red."])         # tensor([...]), demos average 0

Modules, in the order the step runs: loss (the K-wise loss), model (a new RM from the SFT model), lora,
cached_head and blocks (the three methods), evaluate (predictions, accuracy, calibration, ceilings), stage
(notebook 03's stage: comparisons collected, then the chosen method).
"""


from rlhf_lib.artifacts import (
    RewardModel,  # the RM's on-disk format and loader; reward.RewardModel, its old path
)
from rlhf_lib.reward.blocks import (
    BlockFit,
    StateTable,
    build_state_table,
    check_slices,
    decoder_slice,
    evaluate_units,
    first_trained_block,
    pooled_final,
    run_slice,
    scores_of_rows,
    start_head,
    train_blocks,
    train_cached_blocks_rms,
    trainable_block_parameters,
)
from rlhf_lib.reward.cached_head import (
    LEARNING_CURVE_FRACTIONS,
    CachedHeadResult,
    FeatureTable,
    HeadFit,
    RankedUnit,
    build_feature_table,
    cached_predictions,
    comparison_texts,
    fit_head,
    head_from_fit,
    kwise_loss_of_units,
    learning_curve,
    pair_accuracy_of_units,
    ranked_units,
    scored_texts,
    sft_score_std,
    split_prompt_ids,
    train_cached_head,
    train_cached_head_rms,
)
from rlhf_lib.reward.evaluate import (
    COMPARISON_SETS,
    accuracy_ceilings,
    accuracy_table,
    calibration_table,
    comparison_predictions,
    comparison_summary,
    load_comparisons,
    pairwise_accuracy,
    preference_pair_predictions,
)
from rlhf_lib.reward.lora import (
    RewardTrainResult,
    train_lora_rms,
    train_reward_model,
)
from rlhf_lib.reward.loss import (
    kwise_loss,
    ranked_pairs,
)
from rlhf_lib.reward.model import (
    layer_index,
    new_reward_model,
)
from rlhf_lib.reward.stage import (
    METHODS,
    collect_comparisons,
    log_histories,
    run_reward_stage,
)

__all__ = [
    "BlockFit", "COMPARISON_SETS", "CachedHeadResult", "FeatureTable", "HeadFit", "LEARNING_CURVE_FRACTIONS",
    "METHODS", "RankedUnit", "RewardModel", "RewardTrainResult", "StateTable", "accuracy_ceilings",
    "accuracy_table", "build_feature_table", "build_state_table", "cached_predictions", "calibration_table",
    "check_slices", "collect_comparisons", "comparison_predictions", "comparison_summary", "comparison_texts",
    "decoder_slice", "evaluate_units", "first_trained_block", "fit_head", "head_from_fit", "kwise_loss",
    "kwise_loss_of_units", "layer_index", "learning_curve", "load_comparisons", "log_histories", "new_reward_model",
    "pair_accuracy_of_units", "pairwise_accuracy", "pooled_final", "preference_pair_predictions", "ranked_pairs",
    "ranked_units", "run_reward_stage", "run_slice", "scored_texts", "scores_of_rows", "sft_score_std",
    "split_prompt_ids", "start_head", "train_blocks", "train_cached_blocks_rms", "train_cached_head",
    "train_cached_head_rms", "train_lora_rms", "train_reward_model", "trainable_block_parameters",
]
