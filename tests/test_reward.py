"""The reward model: the paper's K-wise loss, where gradients flow, the demo-mean-0 bias, the ablation."""

import math

import pytest
import torch

from rlhf_lib.config import load_preset
from rlhf_lib.reward import (
    RewardModel,
    calibration_table,
    comparison_predictions,
    kwise_loss,
    new_reward_model,
    pairwise_accuracy,
    ranked_pairs,
    train_reward_model,
)


def test_kwise_loss_equals_mean_pairwise_loss_by_hand():
    scores = torch.tensor([2.0, 0.5, -1.0, 0.0])
    ranks = [0, 2, 3, 1]  # best: 0, then 3, then 1, then 2
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = [(0, 1), (0, 2), (0, 3), (1, 2), (3, 1), (3, 2)]  # all C(4,2) = 6 (winner, loser)
    expected = -sum(math.log(sigmoid(scores[w].item() - scores[lo].item())) for w, lo in by_hand) / 6
    assert sorted(ranked_pairs(ranks)) == sorted(by_hand)
    assert kwise_loss(scores, ranks).item() == pytest.approx(expected, rel=1e-6)


def test_ties_are_dropped_and_carry_no_gradient():
    scores = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    ranks = [0, 0, 1]  # 0 and 1 tied; both beat 2
    assert ranked_pairs(ranks) == [(0, 2), (1, 2)]
    kwise_loss(scores, ranks).backward()
    assert scores.grad[0] < 0 and scores.grad[1] < 0 and scores.grad[2] > 0
    all_tied = torch.tensor([0.3, 0.3], requires_grad=True)
    kwise_loss(all_tied, [0, 0]).backward()
    assert torch.count_nonzero(all_tied.grad) == 0


def test_gradient_reaches_only_lora_and_head():
    cfg = load_preset("micro")
    rm = new_reward_model(cfg)
    scores = rm.raw_scores(["Pick a fruit."] * 3, ["Apple.", "A rock.", "Banana."])
    kwise_loss(scores, [0, 2, 1]).backward()
    assert rm.head.linear.weight.grad is not None and rm.head.linear.weight.grad.abs().sum() > 0
    for name, param in rm.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
        else:
            assert not param.requires_grad and param.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in rm.model.named_parameters() if "lora_B" in n)


def _toy_comparisons(n_prompts=6):
    # The preferred completions are polite; the dispreferred ones are rude. Learnable by a micro RM.
    rows = []
    good = ["Thank you, here is a kind answer.", "Sure, happy to help you."]
    bad = ["No. Go away.", "Whatever, idiot."]
    for i in range(n_prompts):
        completions = [good[i % 2], bad[i % 2], good[(i + 1) % 2], bad[(i + 1) % 2]]
        rows.append({"prompt_id": f"p{i}", "prompt": f"Question number {i}?", "completions": completions,
                     "ranks": [0, 2, 1, 3], "labeler_id": "L0"})
    return rows


def test_training_lowers_loss_sets_demo_bias_and_roundtrips(tmp_path):
    cfg = load_preset("micro", {"reward.epochs": 6, "reward.learning_rate": 3e-3, "reward.batch_prompts": 2})
    demos = [("Question number 1?", "Thank you, here is a kind answer."), ("Hi?", "Sure, happy to help you.")]
    result = train_reward_model(cfg, _toy_comparisons(), tmp_path, demonstrations=demos, progress=False)
    losses = result.history["loss"].to_numpy()
    assert losses[-3:].mean() < losses[:3].mean()
    rm = RewardModel.load(result.model_dir)
    demo_scores = rm.score_texts([p for p, _ in demos], [r for _, r in demos])
    assert demo_scores.mean().item() == pytest.approx(0.0, abs=1e-4)  # the paper's normalisation
    predictions = comparison_predictions(rm, _toy_comparisons(), "train")
    assert len(predictions) == 6 * 6 and pairwise_accuracy(predictions) > 0.6
    table = calibration_table(predictions)
    assert table["n"].sum() == len(predictions)


def test_pairwise_ablation_sees_the_same_pairs(tmp_path):
    cfg = load_preset("micro", {"reward.batch_prompts": 2})
    result = train_reward_model(cfg, _toy_comparisons(4), tmp_path, mode="pairwise", progress=False)
    assert result.history["pairs"].sum() == 4 * 6
    assert result.model_dir.name == "model_pairwise"
    kwise = train_reward_model(cfg, _toy_comparisons(4), tmp_path, mode="kwise", progress=False)
    assert kwise.history["pairs"].sum() == 4 * 6
    assert len(kwise.history) < len(result.history) or len(kwise.history) == 2  # 2 prompts per step


def test_score_does_not_depend_on_padding():
    cfg = load_preset("micro")
    rm = new_reward_model(cfg)
    rm.model.eval()
    with torch.no_grad():
        alone = rm.raw_scores(["Hi?"], ["Hello."])
        padded = rm.raw_scores(["Hi?", "A much longer prompt that forces left padding of the first row?"],
                               ["Hello.", "A long answer with many more tokens than the first one has."])
    assert torch.allclose(alone[0], padded[0], atol=1e-4)


@pytest.mark.parametrize("mode", ["kwise", "pairwise"])
def test_small_forward_batches_give_the_same_model(tmp_path, mode):
    """forward_batch bounds memory only: 2 sequences per forward train the same RM as one big forward."""
    heads = []
    for forward_batch in (2, 64):
        cfg = load_preset("micro", {"reward.batch_prompts": 2, "reward.learning_rate": 1e-3, "reward.forward_batch": forward_batch})
        result = train_reward_model(cfg, _toy_comparisons(4), tmp_path / str(forward_batch), mode=mode, progress=False)
        heads.append((RewardModel.load(result.model_dir).head.linear.weight.clone(), result.history["loss"].to_numpy()))
    (small_w, small_loss), (big_w, big_loss) = heads
    # Padding and summation order differ, and Adam amplifies the rounding; float32 on a GPU drifts more than on a
    # CPU (an H200 run missed atol 1e-4), so the bound is loose next to the weights' size but far below a real change.
    torch.testing.assert_close(small_w, big_w, atol=1e-3, rtol=1e-2)
    assert not torch.equal(small_w, torch.zeros_like(small_w))  # the head did train
    # The first loss precedes any update; later ones drift by Adam's amplification of rounding noise.
    assert small_loss[0] == pytest.approx(big_loss[0], abs=1e-5)


def test_score_texts_batches_by_length_but_returns_input_order():
    rm = new_reward_model(load_preset("micro"))
    prompts = ["Hi?", "Tell me a long story about a dragon " * 6, "Why?", "Name a fruit."]
    responses = ["Hello there, friend, how are you today?", "Once.", "Because " * 12, "Apple."]
    one_at_a_time = torch.cat([rm.score_texts([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    batched = rm.score_texts(prompts, responses, batch_size=3)
    torch.testing.assert_close(batched, one_at_a_time, atol=1e-4, rtol=0)
    assert len(set(one_at_a_time.tolist())) == len(prompts)  # distinct scores, so an order mix-up would show


# ---------------------------------------------------------------- the cheap path (cached features + head)


def test_mean_response_pooling_averages_only_the_response_tokens():
    from rlhf_lib import models

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])  # row 1 has no response token: its last token
    pooled = models.pool_states(hidden, attention, response, "mean_response")
    assert pooled.squeeze(1).tolist() == [2.5, 7.0]
    assert models.pool_states(hidden, attention, response, "last").squeeze(1).tolist() == [3.0, 7.0]
    rm = new_reward_model(load_preset("micro"))
    batch = rm.encode(["Hi?", "A longer question here?"], ["Hello there", ""], ended=[True, False])
    n_response = batch["response_mask"].sum(1).tolist()
    assert n_response[0] == len(rm.tokenizer("Hello there", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert n_response[1] == 0  # an empty, truncated answer has no response token: scored at the last one


def test_a_truncated_answer_gets_no_eos():
    rm = new_reward_model(load_preset("micro"))
    eos = rm.tokenizer.eos_token_id
    ended = rm.encode(["Hi?", "Hi?"], ["Hello there", "Hello there"], ended=[True, False])["input_ids"]
    assert ended[0, -1].item() == eos
    assert ended[1, -1].item() != eos
    assert rm.encode(["Hi?"], ["Hello there"])["input_ids"][0, -1].item() == eos  # default: a finished answer


def _linear_toy(n_prompts: int, k: int = 5, dim: int = 16, seed: int = 0):
    """Features whose first coordinate is the utility; rankings by utility plus a little noise."""
    from rlhf_lib.reward import RankedUnit

    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_prompts * k, dim, generator=gen)
    utility = features[:, 0] + 0.03 * torch.randn(n_prompts * k, generator=gen)
    units = []
    for p in range(n_prompts):
        rows = list(range(p * k, (p + 1) * k))
        order = sorted(rows, key=lambda r: -utility[r].item())
        units.append(RankedUnit(f"p{p}", rows, [order.index(r) for r in rows]))
    return features, units


@pytest.mark.parametrize("mode", ["kwise", "pairwise"])
def test_cached_head_learns_a_preference_linear_in_one_feature(mode):
    from rlhf_lib.reward import pair_accuracy_of_units, train_cached_head

    features, units = _linear_toy(60)
    train, held = units[:40], units[40:]
    rc = load_preset("micro", {"reward.head_max_epochs": 60, "reward.head_patience": 10}).reward
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))  # a layer that knows nothing
    result = train_cached_head({3: noise, 7: features}, train, rc, seed=0, mode=mode)
    assert result.layer == 7  # chosen on the validation split of the training prompts
    scores = features @ result.fit.weight + result.fit.intercept
    assert pair_accuracy_of_units(scores, held) > 0.9
    assert set(result.selection["weight_decay"]) == set(rc.head_weight_decays) and result.selection["chosen"].sum() == 1
    # The head found the feature that matters: its weight dominates the 15 irrelevant ones.
    assert result.fit.weight[0].abs() > 3 * result.fit.weight[1:].abs().max()


def test_rankings_that_are_all_ties_do_not_break_the_head_fit():
    from rlhf_lib.reward import RankedUnit, fit_head

    features, units = _linear_toy(8)
    tied = [RankedUnit(f"t{i}", u.rows, [0] * len(u.rows)) for i, u in enumerate(units)]
    fit = fit_head(features, tied[:4] + units, [], weight_decay=0.1, learning_rate=1e-2, batch_prompts=2,
                   max_epochs=3, patience=1)
    assert torch.isfinite(fit.weight).all() and fit.weight[0] > 0
    assert fit.history["train_loss"].notna().all()  # an all-tied batch used to log 0/0


def test_kwise_loss_of_units_is_the_mean_of_each_rankings_kwise_loss():
    from rlhf_lib.reward import RankedUnit, kwise_loss_of_units

    scores = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, 3.0])
    units = [RankedUnit("a", [0, 1, 2, 3], [0, 2, 3, 1]), RankedUnit("b", [4, 5], [1, 0])]
    expected = (kwise_loss(scores[:4], [0, 2, 3, 1]) + kwise_loss(scores[4:], [1, 0])) / 2
    assert kwise_loss_of_units(scores, units).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cached_features_give_the_saved_rms_scores(tmp_path):
    """The head is fitted on cached features; the saved RM must score texts exactly as those features do."""
    from rlhf_lib.reward import build_feature_table, head_from_fit, ranked_units, train_cached_head

    cfg = load_preset("micro", {"reward.head_max_epochs": 5})
    rm = new_reward_model(cfg, trainable=False)
    rows = _toy_comparisons(4)
    for row in rows:
        row["completion_ended"] = [True, False, True, True]
    texts = [(r["prompt"], c, e) for r in rows for c, e in zip(r["completions"], r["completion_ended"], strict=True)]
    table = build_feature_table(rm, texts, batch_size=3, layers=[1, 2], progress=False)
    result = train_cached_head(table.features, ranked_units(table, rows), cfg.reward, seed=0)
    fit = result.fit
    rm.head, rm.bias, rm.layer = head_from_fit(fit, rm.head), 0.25, result.layer
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    row = rows[0]
    saved_scores = loaded.score_texts([row["prompt"]] * 4, row["completions"], ended=row["completion_ended"])
    assert loaded.layer == result.layer and loaded.pooling == "mean_response"
    cached = table.features[result.layer][table.rows(row["prompt"], row["completions"], row["completion_ended"])] @ fit.weight
    torch.testing.assert_close(saved_scores, cached + fit.intercept - 0.25, atol=1e-4, rtol=0)


def test_a_4bit_reward_model_reloads_in_4bit(tmp_path):
    """A 4-bit study's RM must come back 4-bit (it used to reload its base unquantised: a full-precision copy)."""
    from rlhf_lib.models import is_quantized

    cfg = load_preset("micro", {"model.quantize_4bit": True})
    rm = new_reward_model(cfg)
    assert is_quantized(rm.model)
    rm.save(tmp_path / "rm")
    assert is_quantized(RewardModel.load(tmp_path / "rm", device="cpu").model)
    assert not is_quantized(RewardModel.load(tmp_path / "rm", device="cpu", quantize_4bit=False).model)
    plain = new_reward_model(load_preset("micro"))
    plain.save(tmp_path / "plain")
    assert not is_quantized(RewardModel.load(tmp_path / "plain", device="cpu").model)
