"""PPO: the math on hand-computed toys, the roles on one base, and whole runs on the micro model.

The SFT and RM directories are built here from the micro model (random LoRA + ScalarHead), in the
formats rlhf_lib.artifacts documents, so these tests do not depend on the SFT/RM training code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_lib import models
from rlhf_lib.adapters import score_token_ids
from rlhf_lib.artifacts import save_policy_dir, save_reward_dir
from rlhf_lib.config import load_preset
from rlhf_lib.generation import generate
from rlhf_lib.ppo import (
    KLController,
    PPODivergence,
    build_optimizer,
    build_roles,
    clip_gradients,
    collapse_reason,
    collect_rollout,
    distinct_fraction,
    effective_missing_eos_penalty,
    gae,
    iteration_prompts,
    learning_rate_at,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    ppo_update,
    select_checkpoint,
    split_validation_prompts,
    train_ppo,
    value_loss,
)
from rlhf_lib.ppo.rollout import _chunked, trim_left_padding
from rlhf_lib.prompting import format_prompt

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"Write one sentence about topic number {i}." for i in range(8)]
PROSE = ["The river rose in the spring and the town moved its market up the hill.",
         "A lighthouse keeper wrote down the weather every morning for forty years."]


def micro_cfg(**overrides):
    """The micro preset, a little smaller still: 4 episodes of 4 tokens per iteration."""
    values = {"ppo.iterations": 2, "ppo.rollout_batch": 4, "ppo.minibatch": 2, "ppo.ppo_epochs": 1,
              "generation.max_new_tokens": 4, "data.max_prompt_tokens": 64}
    values.update(overrides)
    return load_preset("micro", values)


def _random_lora(seed: int):
    torch.manual_seed(seed)
    lm = models.add_lora(models.load_causal_lm("micro"), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # B = 0 would make the adapter a no-op; give it a real effect
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return lm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro-model ops are tiny: on 2 shared cores a second intra-op thread only adds waiting (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """`sft/` (policy-dir format) and `rm/` (reward-dir format) on the micro base."""
    root = tmp_path_factory.mktemp("ppo_artifacts")
    save_policy_dir(_random_lora(1), "default", root / "sft", "micro")
    torch.manual_seed(2)
    head = models.ScalarHead(models.MICRO_CONFIG["hidden_size"])
    save_reward_dir(_random_lora(3), "default", head, root / "rm", "micro", bias=0.25)
    return root


# ============================================================================================
# The math, by hand
# ============================================================================================


def test_gae_matches_hand_computation_with_mask():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0 ends at t=2, so V_3 = 9 and r_3 = 5 must not leak in:
    #   d2 = 2 - 1.5 = 0.5            A2 = 0.5
    #   d1 = 0 + 1.5 - 1.0 = 0.5      A1 = 0.5 + 0.5 * 0.5 = 0.75
    #   d0 = 1 + 1.0 - 0.5 = 1.5      A0 = 1.5 + 0.5 * 0.75 = 1.875
    # Row 1: only the last reward, zero values: A_t = 0.5 ** (3 - t).
    expected = torch.tensor([[1.875, 0.75, 0.5, 0.0], [0.125, 0.25, 0.5, 1.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_papers_gamma_and_lambda():
    rewards = torch.tensor([[0.0, 0.0, 3.0]])
    advantages, _ = gae(rewards, torch.zeros(1, 3), torch.ones(1, 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[3 * 0.95**2, 3 * 0.95, 3.0]]))


def test_per_token_kl_and_reward_shaping():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = per_token_rewards(logprobs, ref_logprobs, torch.tensor([2.0, -1.0]), mask, kl_beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # -beta * KL at every valid token; the score lands on the LAST VALID token (the EOS), not the last column.
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0], [0.0, -0.1, -1.0]]))


def test_whitening_uses_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    white = masked_whiten(x, mask)
    assert abs(masked_mean(white, mask).item()) < 1e-6
    valid = white[mask.bool()]
    assert abs(valid.std().item() - 1.0) < 1e-3  # unbiased std over the 4 valid entries
    assert (white[~mask.bool()] == 0).all()


def test_clipped_losses_on_a_toy():
    mask = torch.ones(1, 2)
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.75]]))  # ratios 1.0 and 1.5
    advantages = torch.tensor([[1.0, 1.0]])
    loss, stats = policy_loss(new, old, advantages, mask, clip_range=0.2)
    # max(-A r, -A clip(r)) = max(-1, -1) and max(-1.5, -1.2) = -1.2
    assert loss.item() == pytest.approx((-1.0 - 1.2) / 2)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss, _ = value_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), mask, 0.5)
    # token 0: unclipped (2-1)^2 = 1, clipped (0.5-1)^2 = 0.25 -> 1; token 1: 1 -> 0.5 * mean(1, 1)
    assert loss.item() == pytest.approx(0.5)


def test_adaptive_kl_moves_beta_towards_target_and_lr_warms_up():
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, episodes=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * 1.02)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    ppo = micro_cfg(**{"ppo.warmup_iterations": 2, "ppo.learning_rate": 1.0}).ppo
    assert [learning_rate_at(s, ppo, updates_per_iteration=2) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # With one critic warm-up iteration the policy's LR is 0 through it, then warms up on its own clock.
    ppo = dataclasses.replace(ppo, value_warmup_iterations=1)
    assert [learning_rate_at(s, ppo, 2, "policy") for s in range(6)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    assert [learning_rate_at(s, ppo, 2, "value") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    ppo = dataclasses.replace(ppo, value_learning_rate=4.0)  # the critic on its own peak LR
    assert [learning_rate_at(s, ppo, 2, "value") for s in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert learning_rate_at(5, ppo, 2, "policy") == 1.0


def test_adaptive_kl_beta_rises_above_target_falls_below_and_holds_at_it():
    """Ziegler et al.: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * episodes / horizon."""
    above, below, at = (KLController(0.02, adaptive=True, target=3.0, horizon=80) for _ in range(3))
    above.update(current_kl=3.3, episodes=16)  # +10%, inside the clip
    assert above.value == pytest.approx(0.02 * (1 + 0.1 * 16 / 80))
    below.update(current_kl=0.5, episodes=16)  # -83%, clipped to -20%
    assert below.value == pytest.approx(0.02 * (1 - 0.2 * 16 / 80))
    at.update(current_kl=3.0, episodes=16)
    assert at.value == pytest.approx(0.02)
    # A KL stuck above the target keeps raising beta (the collapsed tiny run: 9.4 nats at a fixed 0.02).
    for _ in range(40):
        above.update(current_kl=9.4, episodes=16)
    assert above.value > 0.02 * 1.04**39
    # train_ppo's controller takes its horizon from the preset (tiny: 80 episodes, not Ziegler's 10,000).
    ppo = load_preset("tiny").ppo
    assert ppo.adaptive_kl and 0 < ppo.target_kl < 9.4 and ppo.kl_horizon < 10_000


def test_collapse_guard_fires_on_a_constant_policy_and_not_on_a_healthy_one():
    torch.manual_seed(0)
    vocab, length = 50, 16

    def stats(logits: torch.Tensor, lengths: list[int]) -> dict[str, float]:
        tokens = logits.argmax(-1)
        mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).float()
        _, entropy = logprobs_and_entropy(logits, tokens, temperature=1.0)
        return {"entropy": masked_mean(entropy, mask).item(), "response_length": mask.sum(1).mean().item()}

    start = stats(torch.randn(4, length, vocab), [14, 12, 16, 13])
    healthy = stats(torch.randn(4, length, vocab) * 1.2, [12, 15, 10, 14])  # a bit sharper, about as long
    constant = torch.full((4, length, vocab), -30.0)
    constant[..., 7] = 30.0  # one token, always: "No", "No", ...
    collapsed = stats(constant, [2, 2, 2, 2])
    assert collapse_reason(start, healthy, 0.5) is None
    reason = collapse_reason(start, collapsed, 0.5)
    assert reason is not None and "response length" in reason and "entropy" in reason
    only_short = {**start, "response_length": start["response_length"] * 0.4}
    assert "response length" in collapse_reason(start, only_short, 0.5) and "entropy" not in collapse_reason(start, only_short, 0.5)
    assert collapse_reason(start, collapsed, 0.0) is None  # 0 = off


def test_distinct_fraction_counts_one_answer_taking_over():
    assert distinct_fraction(["A river.", "Two cats", "Yes", "no"]) == 1.0
    assert distinct_fraction(["No", " No", "No\n", "Sure"]) == 0.5


def test_checkpoint_selection_picks_the_best_allowed_validation_point():
    def row(iteration, score, length, distinct):
        return {"iteration": iteration, "score": score, "response_length": length, "distinct_fraction": distinct}

    table = [
        row(0, 0.00, 14.0, 1.00),
        row(5, 0.30, 12.0, 0.94),
        row(10, 0.90, 3.0, 1.00),   # highest score, but 3 < 0.5 x 14 tokens: collapsed
        row(15, 0.80, 13.0, 0.50),  # one answer for half the prompts
        row(20, 0.30, 11.0, 1.00),  # ties with 5: the earlier one wins
        row(25, 0.20, 7.0, 1.00),   # exactly 0.5 x 14: allowed, but lower
    ]
    chosen, why = select_checkpoint(table, fraction=0.5)
    assert chosen == 5 and "0.3000" in why
    assert select_checkpoint(table, fraction=0.0)[0] == 10  # the length check off: only the distinct check
    assert select_checkpoint(table[:1] + [row(5, 1.0, 2.0, 0.2)], fraction=0.5)[0] == 0  # the start can win
    assert select_checkpoint([row(0, 0.0, 14.0, 0.5), row(5, 1.0, 14.0, 0.6)], 0.5)[0] is None
    assert select_checkpoint([], 0.5)[0] is None


def test_validation_prompts_are_a_seeded_choice_disjoint_from_rollouts():
    prompts = [f"p{i}" for i in range(20)] + ["p3"]  # a duplicate goes wholly to one side
    rollout, held = split_validation_prompts(prompts, 5, seed=0)
    assert len(held) == 5 and not set(held) & set(rollout) and set(held) | set(rollout) == set(prompts)
    assert split_validation_prompts(prompts, 5, seed=0) == (rollout, held)
    assert split_validation_prompts(prompts, 5, seed=1)[1] != held
    assert split_validation_prompts(prompts, 0, seed=0) == (prompts, [])
    with pytest.raises(ValueError, match="validation_prompts"):
        split_validation_prompts(prompts, 20, seed=0)


def test_missing_eos_penalty_is_in_units_of_the_rms_sft_score_std():
    ppo = micro_cfg(**{"ppo.missing_eos_penalty": 2.0}).ppo
    assert effective_missing_eos_penalty(ppo, {"base_model": "micro", "sft_score_std": 0.25}) == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="sft_score_std"):
        assert effective_missing_eos_penalty(ppo, {"base_model": "micro"}) == 2.0


def test_policy_and_value_gradients_are_clipped_each_on_its_own():
    small, large = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [small], "role": "policy"}, {"params": [large], "role": "value"}])
    small.grad, large.grad = torch.tensor([0.3, 0.4]), torch.tensor([6.0, 8.0])
    norms = clip_gradients(optimizer, max_norm=1.0)
    assert norms == pytest.approx({"grad_norm": 0.5, "value_grad_norm": 10.0})
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4]))  # under the bound: untouched by the critic's norm
    torch.testing.assert_close(large.grad, torch.tensor([0.6, 0.8]))


def test_iteration_prompts_cover_every_prompt_once_per_epoch():
    seen = iteration_prompts(PROMPTS, 1, 4, seed=0) + iteration_prompts(PROMPTS, 2, 4, seed=0)
    assert sorted(seen) == sorted(PROMPTS)
    assert iteration_prompts(PROMPTS, 3, 4, seed=0) != iteration_prompts(PROMPTS, 3, 4, seed=1)


# ============================================================================================
# The roles on one base
# ============================================================================================


def test_recomputed_logprobs_use_the_rollout_temperature(artifacts, micro_tokenizer):
    # float32: sampling (cached decoding) and one full forward then agree well inside 1e-4; bf16, a GPU's "auto"
    # dtype, rounds the two paths apart by more than that.
    cfg = micro_cfg(**{"generation.temperature": 0.7, "model.dtype": "float32"})
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm", need_reward=False)
    texts = [format_prompt(tokenizer, p) for p in PROMPTS[:2]] + [format_prompt(tokenizer, "Hi")]  # ragged: left padding
    with roles.role("policy") as policy:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
        torch.manual_seed(0)
        out = policy.generate(**encoded, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                              output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    response = out.sequences[:, encoded["input_ids"].shape[1]:]
    sampled_logprobs = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    mask = torch.cat([encoded["attention_mask"], torch.ones_like(response)], 1)
    with torch.no_grad():
        recomputed, _ = roles.policy_logprobs(out.sequences, mask, response.shape[1])
    torch.testing.assert_close(recomputed, sampled_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("capped", [False, True], ids=["head-at-response-only", "logit-cap-whole-forward"])
def test_response_logprobs_are_the_full_forwards_and_zero_after_eos(capped, micro_lora):
    """The LM head run only where a response token is predicted (and there only) gives the log-probs, entropies and
    LoRA gradients of the model's whole forward, with left-padded prompts and right padding after EOS (zero there).
    A model whose config caps the logits after the head (gemma 2) keeps its own forward, the head over every column
    from the first response-predicting one (the micro model itself applies no cap, so the numbers agree either way)."""
    from rlhf_lib.ppo import logprobs_and_entropy, response_logprobs

    model = micro_lora
    if capped:
        model.config.final_logit_softcapping = 3.0
    assert models.logits_are_head_output(model) is not capped
    ids = torch.randint(5, 200, (3, 14), generator=torch.Generator().manual_seed(1)).to(model.device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a shorter prompt, left padded
    mask[1, 11:] = 0  # a response that ended after two tokens
    response_len, temperature = 5, 0.7
    in_response = mask[:, -response_len:].bool()
    head_inputs = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: head_inputs.append(args[0].shape))
    results = []
    for ours in (False, True):
        model.zero_grad()
        if ours:
            logprobs, entropy = response_logprobs(model, ids, mask, response_len, temperature)
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=models.position_ids_from_mask(mask)).logits
            logprobs, entropy = logprobs_and_entropy(logits[:, -response_len - 1 : -1], ids[:, -response_len:], temperature)
        (logprobs * in_response).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((logprobs, entropy, grads))
    (full_lp, full_entropy, full_grads), (lp, entropy, grads) = results
    hidden = models.hidden_size_of(model)
    assert head_inputs[1] == ((len(ids), response_len + 1, hidden) if capped else (int(in_response.sum()), hidden))
    assert not (lp[~in_response]).any() and not (entropy[~in_response]).any()
    torch.testing.assert_close(lp[in_response], full_lp[in_response], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[in_response], full_entropy[in_response], rtol=1e-5, atol=1e-5)
    assert torch.allclose(grads, full_grads, rtol=1e-4, atol=1e-7) and full_grads.abs().max() > 0


def test_ptx_lm_loss_is_the_models_own_loss_over_real_tokens():
    from rlhf_lib.ppo import lm_loss

    torch.manual_seed(0)
    model = models.load_causal_lm("micro", dtype="float32")
    ids = torch.randint(5, 200, (3, 10), generator=torch.Generator().manual_seed(2)).to(model.device)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right-padded pretraining text
    mask[2, 8:] = 0
    own = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert lm_loss(model, ids, mask).item() == pytest.approx(own.item(), rel=1e-5)


def test_adapters_switch_without_leaking_weights(artifacts):
    cfg = micro_cfg(**{"ppo.learning_rate": 1e-2})
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm")
    frozen = {n: p.detach().clone() for n, p in roles.named_parameters()
              if ".reference." in n or ".reward." in n or n.startswith("reward_head")}
    assert frozen and not any(p.requires_grad for n, p in roles.named_parameters() if n in frozen)
    trainable = roles.named_trainable()
    assert any(".policy." in n for n in trainable) and any(".value." in n for n in trainable)
    assert "value_head.linear.weight" in trainable and not any("reward_head" in n for n in trainable)

    rollout = collect_rollout(roles, tokenizer, PROMPTS[:4], cfg, kl_beta=0.02, seed=0)
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
    with torch.no_grad():
        ref_before = roles.reference_logprobs(ids, mask, length)
        reward_before = roles.reward_scores(ids, mask)
        policy_before = roles.policy_logprobs(ids, mask, length)[0]
        values_before = roles.values(ids, mask, length)
    torch.testing.assert_close(policy_before * rollout.response_mask, rollout.ref_logprobs)  # policy starts = SFT

    optimizer = build_optimizer(roles, cfg.ppo)
    ppo_update(roles, optimizer, rollout, cfg.ppo, 4, torch.Generator().manual_seed(0))  # one step, nothing clipped
    # After that backward both trainable adapters and the value head hold gradients; frozen roles none.
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in roles.named_parameters() if n in frozen)
    ppo_update(roles, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(0))  # more steps, more switching
    # Switching roles (including peft's set_adapter inside) never changed what trains.
    assert set(roles.named_trainable()) == set(trainable)

    with torch.no_grad():
        assert torch.equal(roles.reference_logprobs(ids, mask, length), ref_before)
        assert torch.equal(roles.reward_scores(ids, mask), reward_before)
        assert not torch.allclose(roles.policy_logprobs(ids, mask, length)[0], policy_before)
        assert not torch.allclose(roles.values(ids, mask, length), values_before)
    for name, param in roles.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_reference_is_the_bare_base_without_an_sft_adapter(artifacts):
    cfg = micro_cfg(**{"ppo.learning_rate": 1e-2})
    roles, tokenizer, _, _ = build_roles(cfg, None, artifacts / "rm")
    assert roles.adapters["reference"] is None
    rollout = collect_rollout(roles, tokenizer, PROMPTS[:2], cfg, kl_beta=0.02, seed=0)
    assert rollout.kl.abs().max().item() == 0.0  # fresh LoRA (B = 0) equals the base exactly
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=1e-2)
    for _ in range(2):
        ppo_update(roles, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(roles.reference_logprobs(ids, mask, length) * rollout.response_mask,
                                   rollout.ref_logprobs, atol=0, rtol=0)
        assert not torch.allclose(roles.policy_logprobs(ids, mask, length)[0] * rollout.response_mask, rollout.ref_logprobs)


@pytest.fixture()
def micro_roles(artifacts):
    # float32 on every device: these tests compare one forward with another of other batch shapes (ratio 1 on the
    # first minibatch, micro-batch gradient sums, a monotone loss) at float32 precision; bf16, a GPU's "auto"
    # dtype, rounds such forwards apart by ~1e-2.
    cfg = micro_cfg(**{"model.dtype": "float32"})
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm")
    rollout = collect_rollout(roles, tokenizer, PROMPTS[:4], cfg, kl_beta=0.02, seed=0)
    return cfg, roles, tokenizer, rollout


def test_first_minibatch_has_ratio_one_and_no_clipping_and_missing_eos_is_penalised(micro_roles):
    cfg, roles, _, rollout = micro_roles
    expected = rollout.rm_scores - cfg.ppo.missing_eos_penalty * (~rollout.ended_with_eos).float()
    torch.testing.assert_close(rollout.scores, expected)
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=1e-2)
    ppo = micro_cfg(**{"ppo.ppo_epochs": 2}).ppo
    history = ppo_update(roles, optimizer, rollout, ppo, 2, torch.Generator().manual_seed(0))
    first = history[0]
    assert first["ratio_max_dev"] < 1e-5 and first["clip_frac"] == 0.0 and abs(first["approx_kl"]) < 1e-7
    assert max(h["ratio_max_dev"] for h in history[1:]) > 1e-4  # later minibatches see a moved policy


def test_logprobs_from_the_sampler_skip_a_forward_and_equal_the_recomputed_ones(micro_roles, monkeypatch):
    """ppo.logprobs_from_sampler: the rollout takes the sampler's log-probs and entropies (as TRL does) without the
    policy's forward, and in float32 they are the recomputed ones up to rounding, so the first minibatch's ratio
    stays 1 within 1e-4 and nothing is clipped."""
    cfg, roles, tokenizer, recomputed = micro_roles
    fast_cfg = micro_cfg(**{"model.dtype": "float32", "ppo.logprobs_from_sampler": True})
    policy_forwards = []
    original = roles.policy_logprobs
    monkeypatch.setattr(roles, "policy_logprobs", lambda *args: policy_forwards.append(1) or original(*args))
    rollout = collect_rollout(roles, tokenizer, PROMPTS[:4], fast_cfg, kl_beta=0.02, seed=0)
    assert not policy_forwards
    assert torch.equal(rollout.response_ids, recomputed.response_ids)  # the same seed samples the same tokens
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs, recomputed.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(rollout.entropy, recomputed.entropy, atol=1e-4, rtol=0)
    assert not rollout.logprobs[~mask].any() and (rollout.entropy[mask] > 0.1).all()
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=1e-2)
    history = ppo_update(roles, optimizer, rollout, fast_cfg.ppo, 2, torch.Generator().manual_seed(0))
    assert len(policy_forwards) == len(history) == 2  # the update's own forward of each minibatch, no other
    assert history[0]["ratio_max_dev"] < 1e-4 and history[0]["clip_frac"] == 0.0


def test_rollout_takes_the_penalty_in_score_units(micro_roles):
    cfg, roles, tokenizer, rollout = micro_roles
    assert not rollout.ended_with_eos.all()  # 4 tokens from a random model: the penalty applies
    scaled = collect_rollout(roles, tokenizer, PROMPTS[:4], cfg, kl_beta=0.02, seed=0, missing_eos_penalty=3.0)
    torch.testing.assert_close(scaled.rm_scores, rollout.rm_scores)
    torch.testing.assert_close(scaled.scores, rollout.rm_scores - 3.0 * (~rollout.ended_with_eos).float())


def test_policy_loss_decreases_on_a_fixed_batch(micro_roles):
    cfg, roles, _, rollout = micro_roles
    ppo = dataclasses.replace(cfg.ppo, clip_range=10.0)  # no clipping: the surrogate itself must go down
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=3e-3)
    losses = [ppo_update(roles, optimizer, rollout, ppo, 4, torch.Generator())[0]["policy_loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False)), losses


def test_critic_warm_up_trains_the_value_alone(micro_roles):
    cfg, roles, _, rollout = micro_roles
    optimizer = build_optimizer(roles, dataclasses.replace(cfg.ppo, learning_rate=1e-2))
    policy = roles.named_policy_parameters()
    value = {n: p for n, p in roles.named_trainable().items() if n not in policy}
    assert policy and value and "value_head.linear.weight" in value
    before = {n: p.detach().clone() for n, p in roles.named_trainable().items()}
    history = ppo_update(roles, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(0), update_policy=False)
    assert len(history) == 2 and all(h["grad_norm"] != h["grad_norm"] for h in history)  # NaN: no policy gradient
    assert all(torch.equal(p, before[n]) for n, p in policy.items())
    assert all(p not in optimizer.state for p in policy.values())  # no Adam moments for a step never taken
    assert any(not torch.equal(p, before[n]) for n, p in value.items())
    ppo_update(roles, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(0))  # then both learn
    assert any(not torch.equal(p, before[n]) for n, p in policy.items())


def test_micro_batches_add_up_to_the_minibatch_gradient(micro_roles):
    cfg, roles, _, rollout = micro_roles
    trainable = roles.named_trainable()
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=0.0)  # gradients only, weights stay put
    grads = []
    for micro in (4, 1):
        ppo_update(roles, optimizer, rollout, cfg.ppo, 4, torch.Generator().manual_seed(0), micro_batch_size=micro)
        grads.append({n: p.grad.clone() for n, p in trainable.items()})
    for name in trainable:
        # Summation order differs; float32 on a GPU rounds more than on a CPU (an H200 run missed atol 1e-6 by 1.65e-6).
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


class CountingSampler:
    """A PretrainSampler stand-in that records whether PPO asked it for text."""

    def __init__(self, tokenizer, device: torch.device):
        self.tokenizer, self.device, self.calls = tokenizer, device, 0

    def batch(self, generator):
        self.calls += 1
        enc = self.tokenizer(PROSE, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return enc["input_ids"], enc["attention_mask"]  # on the model's device, as PretrainSampler's are


@pytest.mark.parametrize("ptx_coef", [0.0, 1.0])
def test_ptx_gradient_only_when_ptx_coef_positive(micro_roles, ptx_coef):
    cfg, roles, tokenizer, rollout = micro_roles
    # Zero advantages and returns equal to the old values: the PPO terms have exactly zero gradient,
    # so any gradient on the policy adapter can only come from the pretraining term.
    rollout.advantages = torch.zeros_like(rollout.advantages)
    rollout.returns = rollout.values.clone()
    policy = roles.named_policy_parameters()
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=0.0)
    sampler = CountingSampler(tokenizer, next(roles.parameters()).device)
    history = ppo_update(roles, optimizer, rollout, cfg.ppo, 4, torch.Generator(), ptx_coef=ptx_coef, ptx_sampler=sampler)
    grad_total = sum(p.grad.abs().sum().item() for p in policy.values() if p.grad is not None)
    if ptx_coef == 0:
        assert sampler.calls == 0 and grad_total == 0.0
        assert history[0]["ptx_loss"] != history[0]["ptx_loss"]  # NaN: not computed
    else:
        assert sampler.calls == 1 and grad_total > 0
        assert history[0]["ptx_loss"] > 0


def test_non_finite_loss_raises_before_stepping(micro_roles):
    cfg, roles, _, rollout = micro_roles
    rollout.advantages[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in roles.named_trainable().items()}
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=1e-2)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        ppo_update(roles, optimizer, rollout, cfg.ppo, 4, torch.Generator())
    assert all(torch.equal(p, before[n]) for n, p in roles.named_trainable().items())


def test_in_model_rm_score_is_the_reward_stage_definition(artifacts):
    """PPO's in-model score (shared base) equals rlhf_lib.reward's text score on the same tokens."""
    from rlhf_lib.reward import RewardModel

    # CPU on purpose: both sides score with this one RM, so its device is not under test; CPU keeps it float32.
    rm = RewardModel.load(artifacts / "rm", device="cpu")
    prompts, responses = ["Hi", "Tell me a much longer story about a dragon and a cat."], ["Hello!", "Once upon a time."]
    batch = rm.encode(prompts, responses)
    with torch.no_grad():
        ours = score_token_ids(rm.model, rm.head, batch["input_ids"], batch["attention_mask"], bias=rm.bias)
    torch.testing.assert_close(ours, rm.score_texts(prompts, responses), atol=1e-5, rtol=0)
    assert rm.bias == 0.25


def test_rm_that_cannot_share_the_base_scores_text_separately(artifacts, tmp_path, micro_tokenizer):
    """A fully fine-tuned RM (or one on another base) is its own model, called on (prompt, response) text."""
    rm_dir = tmp_path / "rm_full"
    models.load_causal_lm("micro").save_pretrained(rm_dir / "full")
    micro_tokenizer.save_pretrained(rm_dir / "full")
    torch.manual_seed(4)
    models.ScalarHead(models.MICRO_CONFIG["hidden_size"]).save(rm_dir / "head.safetensors")
    (rm_dir / "meta.json").write_text(json.dumps({"base_model": "micro", "bias": 0.5, "finetune": "full"}))
    cfg = micro_cfg()
    with pytest.warns(UserWarning, match="value function starts from the SFT adapter"):
        roles, tokenizer, reward_fn, _ = build_roles(cfg, artifacts / "sft", rm_dir)
    assert reward_fn is not None and not roles.scores_internally and "reward" not in roles.adapters
    assert roles.value_head.linear.weight.abs().sum() == 0  # values start at the head's bias, 0
    rollout = collect_rollout(roles, tokenizer, PROMPTS[:2], cfg, kl_beta=0.02, reward_fn=reward_fn, seed=0)
    from rlhf_lib.reward import RewardModel

    expected = RewardModel.load(rm_dir).score_texts(rollout.prompts, rollout.responses)  # the default device, as PPO's
    torch.testing.assert_close(rollout.rm_scores.cpu(), expected.cpu())


# ============================================================================================
# Whole runs
# ============================================================================================


@pytest.fixture(scope="module")
def finished_run(artifacts, tmp_path_factory):
    """One uninterrupted 2-iteration run with the shared-base RM (reused by several tests)."""
    out = tmp_path_factory.mktemp("ppo_run") / "out"
    result = train_ppo(micro_cfg(**{"ppo.ema_decay": 0.9}), artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, out,
                       ptx=False, progress=False)
    return result


def test_end_to_end_run_writes_metrics_samples_and_adapters(finished_run):
    result = finished_run
    assert result.iterations == 2 and [row["iteration"] for row in result.metrics] == [1.0, 2.0]
    header = result.metrics_csv.read_text().splitlines()[0].split(",")
    for column in ("score", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "policy_loss", "ptx_loss",
                   "response_length", "explained_variance", "eos_rate", "time_s", "distinct_fraction", "collapsed"):
        assert column in header
    samples = [json.loads(line) for line in result.samples_jsonl.read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {1, 2} and {"prompt", "response", "score"} <= set(samples[0])
    assert any(result.tensorboard_dir.glob("events.out.tfevents.*"))
    assert json.loads((result.policy_dir / "meta.json").read_text())["base_model"] == "micro"
    assert (result.policy_dir / "adapter_model.safetensors").exists() and (result.out_dir / "policy_last").is_dir()
    assert (result.value_dir / "head.safetensors").exists()
    assert [p.name for p in result.out_dir.glob("checkpoint-*")] == ["checkpoint-000002"]
    # policy_last holds exactly the checkpoint's policy weights, under peft's adapter-free key names.
    from safetensors.torch import load_file

    checkpoint = load_file(str(result.out_dir / "checkpoint-000002" / "trainable.safetensors"))
    exported = load_file(str(result.out_dir / "policy_last" / "adapter_model.safetensors"))
    policy = {k.removeprefix("model.").replace(".policy.", "."): v for k, v in checkpoint.items() if ".policy." in k}
    assert policy.keys() == exported.keys() and all(torch.equal(policy[k], exported[k]) for k in policy)


def test_interrupted_run_resumes_and_reproduces(finished_run, artifacts, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import rlhf_lib.ppo.trainer as ppo_module  # the loop looks these names up in trainer

    cfg = micro_cfg(**{"ppo.ema_decay": 0.9})
    real_save = ppo_module.save_checkpoint

    def crash_at_second(out_dir, roles, optimizer, state, ema, extra):
        if state.iteration == 2:  # the metrics row of iteration 2 is already written: it must be dropped
            raise KeyboardInterrupt
        return real_save(out_dir, roles, optimizer, state, ema, extra)

    monkeypatch.setattr(ppo_module, "save_checkpoint", crash_at_second)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(cfg, artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, tmp_path, ptx=False, progress=False)
    monkeypatch.setattr(ppo_module, "save_checkpoint", real_save)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-000001"]
    # What a kill -9 inside the second checkpoint's write leaves (a KeyboardInterrupt cleans up after itself):
    half_written = tmp_path / ".checkpoint-000002.partial-killed"
    half_written.mkdir()
    (half_written / "trainable.safetensors").write_bytes(b"half")

    resumed = train_ppo(cfg, artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, tmp_path, ptx=False, progress=False)
    assert not half_written.exists()  # else the stage publishes it beside the run
    assert resumed.iterations == 2 and [row["iteration"] for row in resumed.metrics] == [1.0, 2.0]
    for key in ("score", "kl", "policy_loss", "value_loss"):
        assert [r[key] for r in resumed.metrics] == [r[key] for r in finished_run.metrics], key
    a = load_file(str(finished_run.out_dir / "checkpoint-000002" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "checkpoint-000002" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(str(finished_run.policy_dir / "adapter_model.safetensors"))
    ema_b = load_file(str(resumed.policy_dir / "adapter_model.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def _scripted_validation(monkeypatch, scores: dict[int, float], crash_at: int | None = None):
    """Real greedy validation, but with the score of each validation point taken from `scores` (the iteration
    is read off the newest checkpoint, so it holds across a resume); optionally interrupted once at `crash_at`."""
    import rlhf_lib.ppo.trainer as ppo_module  # the loop looks these names up in trainer

    real, crashed = ppo_module.validate_policy, []

    def scripted(roles, tokenizer, prompts, cfg, reward_fn, penalty):
        stats = real(roles, tokenizer, prompts, cfg, reward_fn, penalty)
        checkpoint = ppo_module.latest_checkpoint(scripted.out_dir)
        iteration = int(checkpoint.name.split("-")[1]) if checkpoint else 0
        if iteration == crash_at and not crashed:
            crashed.append(iteration)
            raise KeyboardInterrupt
        return {**stats, "score": scores[iteration], "distinct_fraction": 1.0}

    monkeypatch.setattr(ppo_module, "validate_policy", scripted)
    return scripted


def test_validation_exports_the_chosen_iterate_and_survives_an_interrupted_validation(artifacts, tmp_path, monkeypatch):
    import csv

    from safetensors.torch import load_file

    cfg = micro_cfg(**{"ppo.iterations": 3, "ppo.validation_prompts": 2, "ppo.validation_every": 2,
                       "ppo.collapse_fraction": 0.0, "ppo.learning_rate": 1e-2})
    scores = {0: 0.1, 2: 0.5, 3: 0.2}  # validated at 0, every 2nd, and the last
    args = (cfg, artifacts / "sft", artifacts / "rm", PROMPTS, PROSE)
    clean = _scripted_validation(monkeypatch, scores)
    clean.out_dir = tmp_path / "clean"
    done = train_ppo(*args, clean.out_dir, ptx=False, progress=False)
    assert done.chosen_iteration == 2 and done.iterations == 3
    rows = list(csv.DictReader(done.validation_csv.open()))
    assert [int(r["iteration"]) for r in rows] == [0, 2, 3] and [r["best_so_far"] for r in rows] == ["True", "True", "False"]
    meta = json.loads((done.policy_dir / "meta.json").read_text())
    assert meta["chosen_iteration"] == 2 and meta["iterations"] == 3 and "validation" in meta["selection"]
    chosen = load_file(str(done.policy_dir / "adapter_model.safetensors"))
    last = load_file(str(done.out_dir / "policy_last" / "adapter_model.safetensors"))
    assert chosen.keys() == last.keys() and any(not torch.equal(chosen[k], last[k]) for k in chosen)
    result = json.loads((done.out_dir / "result.json").read_text())
    assert result["chosen_iteration"] == 2 and result["stop_reason"] is None
    # Validation prompts never appear in a rollout.
    held = set(result["validation_prompt_list"])
    assert len(held) == 2 and not held & {json.loads(x)["prompt"] for x in done.samples_jsonl.read_text().splitlines()}

    # Interrupted inside the validation of iteration 2 (its checkpoint already written): the rerun redoes that
    # validation before iteration 3, keeps the best copy across the resume and exports the same weights.
    resumed = _scripted_validation(monkeypatch, scores, crash_at=2)
    resumed.out_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_ppo(*args, resumed.out_dir, ptx=False, progress=False)
    again = train_ppo(*args, resumed.out_dir, ptx=False, progress=False)
    assert again.chosen_iteration == 2
    assert [int(r["iteration"]) for r in csv.DictReader(again.validation_csv.open())] == [0, 2, 3]
    exported = load_file(str(again.policy_dir / "adapter_model.safetensors"))
    assert all(torch.equal(exported[k], chosen[k]) for k in chosen)
    assert [p.name for p in again.out_dir.glob("best-*")] == ["best-000002"]


@pytest.mark.parametrize("action", ["stop", "flag"])
def test_collapse_guard_stops_cleanly_or_flags(artifacts, tmp_path, monkeypatch, action):
    import rlhf_lib.ppo.trainer as ppo_module  # the loop looks these names up in trainer

    calls = []

    def fires_from_the_second_rollout(start, current, fraction):
        calls.append(dict(current))
        return "mean response length 1 < 0.5 x its start value 4" if len(calls) >= 2 else None

    monkeypatch.setattr(ppo_module, "collapse_reason", fires_from_the_second_rollout)
    cfg = micro_cfg(**{"ppo.iterations": 3, "ppo.collapse_action": action})
    run = lambda: train_ppo(cfg, artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, tmp_path, ptx=False, progress=False)  # noqa: E731
    if action == "stop":
        with pytest.warns(UserWarning, match="collapse guard at iteration 2"):
            result = run()
        # Iteration 2's rollout is logged, flagged and never trained on; the last iterate is iteration 1's.
        assert result.iterations == 1 and [r["iteration"] for r in result.metrics] == [1.0, 2.0]
        assert [r["collapsed"] for r in result.metrics] == [0.0, 1.0]
        assert result.metrics[1]["policy_loss"] != result.metrics[1]["policy_loss"]  # NaN: no update
        assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-000001"]
        record = json.loads((tmp_path / "result.json").read_text())
        assert "iteration 2" in record["stop_reason"] and record["collapsed_iterations"] == [2]
        assert result.policy_dir.joinpath("adapter_model.safetensors").exists()
    else:
        result = run()
        assert result.iterations == 3 and result.stop_reason is None
        assert [r["collapsed"] for r in result.metrics] == [0.0, 1.0, 1.0]
        assert all(r["policy_loss"] == r["policy_loss"] for r in result.metrics)  # every iteration trained


def test_divergence_guard_fires_on_injected_nan_and_keeps_last_checkpoint(artifacts, tmp_path):
    calls = {"n": 0}

    def reward_fn(prompts, responses):
        calls["n"] += 1
        scores = torch.zeros(len(prompts))
        if calls["n"] == 2:
            scores[0] = float("nan")
        return scores

    with pytest.raises(PPODivergence, match="non-finite reward-model scores") as err:  # no validation: calls = rollouts
        train_ppo(micro_cfg(**{"ppo.validation_prompts": 0}), artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, tmp_path, ptx=False,
                  reward_fn=reward_fn, progress=False)
    assert err.value.iteration == 2 and err.value.checkpoint.name == "checkpoint-000001"
    assert json.loads((tmp_path / "DIVERGED.json").read_text())["iteration"] == 2
    assert len(tmp_path.joinpath("metrics.csv").read_text().splitlines()) == 2  # header + iteration 1


def test_entropy_guard_stops_before_any_update(artifacts, tmp_path):
    cfg = micro_cfg(**{"ppo.min_entropy": 1e6})
    with pytest.raises(PPODivergence, match="entropy") as err:
        train_ppo(cfg, artifacts / "sft", None, PROMPTS, PROSE, tmp_path, ptx=False,
                  reward_fn=lambda p, r: torch.zeros(len(p)), progress=False)
    assert err.value.iteration == 1 and err.value.checkpoint is None


def test_ppo_ptx_run_logs_the_pretraining_loss(artifacts, tmp_path):
    cfg = micro_cfg(**{"ppo.iterations": 1, "ppo.ptx_coef": 2.0, "ppo.ptx_batch": 2})
    result = train_ppo(cfg, artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, tmp_path, ptx=True, progress=False)
    assert result.metrics[0]["ptx_loss"] > 0  # an LM loss in nats, logged every iteration
    assert json.loads((result.policy_dir / "meta.json").read_text())["method"] == "ppo-ptx"


def test_ptx_flag_needs_a_positive_coefficient(artifacts, tmp_path):
    with pytest.raises(ValueError, match="ptx_coef"):
        train_ppo(micro_cfg(**{"ppo.ptx_coef": 0.0}), artifacts / "sft", artifacts / "rm", PROMPTS, PROSE, tmp_path, ptx=True, progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ranks_stay_in_sync(artifacts, tmp_path):
    # CPU gloo on purpose: with CUDA visible, accelerate's CPU barrier still names a GPU per rank and rank 1 fails.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(REPO / "tests" / "ppo_ddp_worker.py"), str(artifacts), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "sync.json").read_text())
    assert record["world_size"] == 2 and record["ranks"] == [0, 1]
    assert record["return_sums"][0] != record["return_sums"][1]  # the ranks saw different episodes...
    first, second = record["checksums"]
    assert first == second  # ...yet hold identical weights after the DDP step
    assert first != record["initial_checksum"]
    assert record["iterations"] == 1 and record["metrics_rows"] == 1 and record["checkpoint"]


@pytest.mark.slow
def test_four_bit_base_takes_a_step(artifacts):
    pytest.importorskip("bitsandbytes")
    cfg = micro_cfg(**{"model.quantize_4bit": True, "ppo.learning_rate": 1e-2})
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm")  # cuda when present, else CPU
    assert getattr(roles.model.get_base_model(), "is_loaded_in_4bit", False)
    rollout = collect_rollout(roles, tokenizer, PROMPTS[:2], cfg, kl_beta=0.02, seed=0)
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
    with torch.no_grad():
        ref_before = roles.reference_logprobs(ids, mask, length)
    optimizer = torch.optim.AdamW(list(roles.named_trainable().values()), lr=1e-2)
    ppo_update(roles, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(0))
    # Nonzero, not just present: bitsandbytes' CPU repacking would silently cut the backward (ppo.py prevents it).
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in roles.named_trainable().values())
    with torch.no_grad():
        assert torch.equal(roles.reference_logprobs(ids, mask, length), ref_before)


def test_generation_shapes_are_what_ppo_assumes(micro_tokenizer):
    """generate() gives left-padded queries and responses whose mask is a prefix ending at EOS."""
    torch.manual_seed(0)
    model = models.load_causal_lm("micro")
    out = generate(model, micro_tokenizer, [format_prompt(micro_tokenizer, p) for p in ("a", "a longer prompt")],
                   max_new_tokens=4, temperature=1.0)
    assert (out.query_mask[:, -1] == 1).all()  # left padding: every query ends in the last column
    mask = out.response_mask
    assert torch.equal(mask, mask.cummin(dim=1).values)  # a prefix: once 0, stays 0


def test_over_long_prompt_keeps_its_end(micro_tokenizer):
    """A prompt over max_prompt_tokens is cut at its start: the assistant cue at its end must survive."""
    model = models.load_causal_lm("micro")
    text = format_prompt(micro_tokenizer, "word " * 200)
    cue = micro_tokenizer(text, add_special_tokens=False)["input_ids"][-8:]
    out = generate(model, micro_tokenizer, [text], max_new_tokens=2, temperature=0.0, max_prompt_tokens=32)
    assert out.query_ids.shape[1] == 32
    assert out.query_ids[0, -8:].tolist() == cue


def test_score_trend_compares_each_prompt_with_itself():
    """A steady rise is found with its size even when hard prompts are drawn late; no rise gives ~0."""
    import numpy as np
    import pandas as pd

    from rlhf_lib.evaluation.ppo_logs import score_trend

    rng = np.random.default_rng(0)
    rows = []
    for p in range(40):
        offset = -3.0 if p >= 20 else 3.0  # the second half of the prompts is much harder ...
        iterations = rng.choice(np.arange(1, 6) if p < 20 else np.arange(6, 11), size=3, replace=False)  # ... and drawn late
        for it in iterations:
            rows.append({"prompt": f"p{p}", "iteration": int(it), "rm_score": offset + 0.1 * it + rng.normal(0, 0.05)})
    samples = pd.DataFrame(rows)
    naive = np.polyfit(samples["iteration"], samples["rm_score"], 1)[0]
    assert naive < 0  # a pooled regression reads the prompt mix as a fall
    trend = score_trend(samples, n_resamples=500)
    assert trend.n == 40 and trend.value == pytest.approx(0.1, abs=0.01)
    assert 0.08 < trend.ci_low < 0.1 < trend.ci_high < 0.12
    flat = samples.assign(rm_score=samples["prompt"].str[1:].astype(int) + rng.normal(0, 0.05, len(samples)))
    flat_trend = score_trend(flat, n_resamples=500)
    assert flat_trend.ci_low < 0 < flat_trend.ci_high
    once = pd.DataFrame({"prompt": ["a", "b"], "iteration": [1, 2], "rm_score": [0.0, 1.0]})
    assert score_trend(once).n == 0  # no prompt seen twice: nothing to compare


def test_response_diversity_finds_one_answer_taking_over():
    """Varied answers give distinct share 1; a policy that says "No" to 3 of 4 prompts is caught, whitespace aside."""
    import pandas as pd

    from rlhf_lib.evaluation.ppo_logs import response_diversity

    samples = pd.DataFrame({
        "iteration": [1, 1, 1, 1, 2, 2, 2, 2],
        "response": ["A river.", "Two cats", "Yes, because ...", "no", "No", " No", "No\n", "Sure"],
    })
    table = response_diversity(samples)
    assert list(table.index) == [1, 2]
    assert table.loc[1, "distinct_share"] == 1.0 and table.loc[1, "top_share"] == 0.25
    assert table.loc[2, "top_response"] == "No" and table.loc[2, "top_share"] == 0.75
    assert table.loc[2, "distinct_share"] == 0.5 and table.loc[2, "episodes"] == 4


def test_value_starts_as_the_normalised_rm(artifacts):
    """V on a full sequence equals the RM score PPO is paid, bias (0.25 here) included: an offset would
    become a negative advantage on every response's last tokens, whatever the reward."""
    cfg = micro_cfg()
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm")
    tokenizer.padding_side = "left"
    enc = tokenizer(["Hello there", "A longer text about rivers"], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(next(roles.parameters()).device)
    with torch.no_grad():
        with roles.role("value") as model:
            values = score_token_ids(model, roles.value_head, enc["input_ids"], enc["attention_mask"])
        scores = roles.reward_scores(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(values, scores, atol=1e-5, rtol=0)
    assert scores.abs().min() > 1e-3  # not trivially zero


def test_health_figure_overlays_runs_and_marks_the_chosen_iteration(tmp_path):
    import pandas as pd

    from rlhf_lib import plots

    def metrics(lengths, collapsed):
        n = len(lengths)
        return pd.DataFrame({"iteration": range(1, n + 1), "response_length": lengths, "distinct_fraction": [1.0] * n,
                             "entropy": [3.0] * n, "collapsed": collapsed})

    runs = {"PPO": metrics([14, 8, 2], [False, False, True]), "PPO-ptx": metrics([14, 13, 12], [False] * 3)}
    validation = {"PPO": pd.DataFrame({"iteration": [0, 2], "score": [0.1, 0.4], "allowed": [True, False]}), "PPO-ptx": None}
    png = plots.plot_ppo_health(runs, tmp_path / "health.png", validation, {"PPO": 0, "PPO-ptx": None})
    data = pd.read_csv(png.with_suffix(".csv"))
    assert png.exists() and set(data["run"]) == {"PPO", "PPO-ptx"}
    picked = data[(data["source"] == "validation") & data["chosen"]]
    assert picked["iteration"].tolist() == [0]
    assert data[(data["source"] == "training") & data["collapsed"]]["iteration"].tolist() == [3]


def test_a_value_reading_a_middle_layer_trains_only_the_blocks_below(tmp_path, artifacts):
    """An RM whose head reads hidden_states[1] (of 2 blocks): the value (which starts as the RM) and the reward run
    block 1 no more, so its value-adapter weights stay frozen through role switches and updates (their gradient is
    zero); the values and scores are those of a forward through every block."""
    torch.manual_seed(2)
    head = models.ScalarHead(models.MICRO_CONFIG["hidden_size"])
    save_reward_dir(_random_lora(3), "default", head, tmp_path / "rm", "micro", bias=0.25, layer=1,
                    pooling="mean_response")
    cfg = micro_cfg(**{"model.dtype": "float32"})
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", tmp_path / "rm")
    trainable = roles.named_trainable()
    value_block_1 = [n for n in trainable if ".layers.1." in n and ".value." in n]
    assert not value_block_1 and any(".layers.0." in n and ".value." in n for n in trainable)
    assert any(".layers.1." in n and ".policy." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in roles.named_parameters() if ".layers.1." in n and "lora_A.value" in n}
    below = {n: p.detach().clone() for n, p in roles.named_parameters() if ".layers.0." in n and "lora_B.value" in n}
    assert frozen and below
    rollout = collect_rollout(roles, tokenizer, PROMPTS[:4], cfg, kl_beta=0.02, seed=0)
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_ids.shape[1]
    with torch.no_grad(), roles.role("value") as model:  # every block, then hidden_states[1]
        states = models.hidden_states(model, *trim_left_padding(ids, mask))[1]
        torch.testing.assert_close(roles.value_head(states)[:, -length - 1 : -1] * rollout.response_mask,
                                   rollout.values, atol=1e-6, rtol=0)
    optimizer = build_optimizer(roles, cfg.ppo)
    ppo_update(roles, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(0))
    params = dict(roles.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    assert not all(torch.equal(params[n], before) for n, before in below.items())
    assert not any(params[n].requires_grad for n in frozen)


@pytest.mark.parametrize("warm_up", [False, True])
def test_backward_per_network_is_the_joint_update(artifacts, warm_up):
    """One process backpropagates the policy's loss (and PPO-ptx's) before the value's forward: the same update as
    the joint backward DDP needs, in the critic warm-up too (micro-batch pieces, two epochs, ptx on)."""
    cfg = micro_cfg(**{"model.dtype": "float32", "ppo.ppo_epochs": 2})
    runs = []
    for per_network in (False, True):
        roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm")
        rollout = collect_rollout(roles, tokenizer, PROMPTS[:4], cfg, kl_beta=0.02, seed=0)
        optimizer = build_optimizer(roles, dataclasses.replace(cfg.ppo, learning_rate=1e-2))
        history = ppo_update(roles, optimizer, rollout, cfg.ppo, 4, torch.Generator().manual_seed(0),
                             micro_batch_size=2, ptx_coef=0.5, update_policy=not warm_up,
                             ptx_sampler=CountingSampler(tokenizer, next(roles.parameters()).device),
                             backward_per_network=per_network)
        runs.append((history, {n: p.detach().clone() for n, p in roles.named_trainable().items()}))
    (joint_history, joint), (split_history, split) = runs
    for name in ("loss", "policy_loss", "value_loss", "ptx_loss", "grad_norm", "value_grad_norm"):
        assert [h[name] for h in split_history] == pytest.approx([h[name] for h in joint_history], rel=1e-5,
                                                                 nan_ok=True), name
    assert joint_history[-1]["value_grad_norm"] > 0 and (warm_up or joint_history[-1]["grad_norm"] > 0)
    for name, value in joint.items():
        torch.testing.assert_close(split[name], value, atol=1e-6, rtol=1e-5)


def test_rollout_forwards_run_in_length_chunks_and_come_back_in_row_order():
    """Rows of similar length share a chunk within the token budget, each chunk trimmed of its shared left padding;
    every output row is its own input row's."""
    prompt_lengths, response_len = [3, 9, 1, 7, 2, 8], 2
    width = max(prompt_lengths) + response_len
    mask = torch.zeros(len(prompt_lengths), width, dtype=torch.long)
    for row, length in enumerate(prompt_lengths):
        mask[row, width - response_len - length :] = 1
    ids = torch.arange(len(prompt_lengths))[:, None].expand(-1, width) * mask
    seen = []

    def forward(chunk_ids, chunk_mask):
        seen.append(tuple(chunk_ids.shape))
        return chunk_ids.max(dim=1).values, chunk_mask.sum(dim=1)

    rows, lengths = _chunked(forward, 24, ids, mask)
    assert rows.tolist() == list(range(len(prompt_lengths)))
    assert lengths.tolist() == [length + response_len for length in prompt_lengths]
    assert seen == [(2, 11), (2, 9), (2, 4)]  # prompts (9, 8) (7, 3) (2, 1), + 2 response columns: rows x width <= 24
