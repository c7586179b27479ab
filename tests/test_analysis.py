"""The analysis stage (05), DPO and the summary report, on the micro model with fake upstream stages.

The data, SFT, reward and PPO stage directories are written here in the formats the real stages write
(StudyData, policy dirs, reward dirs, comparisons, predictions, samples.jsonl), so these tests do not
depend on any upstream training code and run in seconds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from rlhf_lib import models
from rlhf_lib.adapters import save_policy_dir, save_reward_dir
from rlhf_lib.analysis import (
    export_results,
    find_upstream,
    load_metrics,
    load_tables,
    rm_predictions_with_short_sets,
    run_analysis_stage,
)
from rlhf_lib.config import load_preset
from rlhf_lib.data.schema import (
    PREFERENCE_PAIR_FEATURES,
    PRETRAIN_FEATURES,
    PROMPT_FEATURES,
    QA_FEATURES,
    TOXICITY_FEATURES,
    TRUTHFULQA_FEATURES,
    to_dataset,
)
from rlhf_lib.data.study import StudyData, build_data_stage
from rlhf_lib.dpo import (
    dpo_loss,
    length_grouped_batches,
    pair_batch,
    preference_pairs,
    sequence_logprobs,
    tokenize_pairs,
    train_dpo,
)
from rlhf_lib.generation import generate
from rlhf_lib.pipeline import RunPaths, cached_stage
from rlhf_lib.prompting import format_prompt
from rlhf_lib.report import format_result, headline_table, versus_chance, versus_method, write_summary
from rlhf_lib.sft import load_policy

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = {
    "generation.max_new_tokens": 4,
    "generation.batch_size": 4,
    "reward.max_seq_tokens": 128,
    "evaluation.bootstrap_samples": 20,
    "evaluation.best_of_n": 2,
    "evaluation.few_shot_examples": 1,
    "evaluation.max_items": 3,
    "evaluation.dpo_batch_size": 2,
    "evaluation.dpo_learning_rate": 1e-2,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro-model ops are tiny: on 2 shared cores a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Fake upstream stages
# --------------------------------------------------------------------------------------------


def _prompt(split: str, i: int, prompt: str, reference: str, **extra) -> dict:
    row = {"id": f"fx/{split}/{i}", "prompt": prompt, "reference": reference, "task": "fixture", "category": "generation",
           "source": "fixture", "context": "", "allowed_labels": [], "split": split}
    row.update(extra)
    return row


PROMPTS = (
    [_prompt("sft", i, f"Name a colour number {i}.", f"Colour {i} is red.") for i in range(4)]
    + [_prompt("rm", i, f"Describe a river in {i + 2} words.", "A long cold river.") for i in range(2)]
    + [_prompt("ppo", i, f"Write a greeting for guest {i}.", f"Welcome, guest {i}!") for i in range(3)]
    + [_prompt("eval", 0, "What is the capital of France?", "Paris."),
       _prompt("eval", 1, "Give a synonym of happy.", "Glad."),
       _prompt("eval", 2, "Passage: Tom has 3 apples and buys 2 more.\n\nHow many apples does Tom have?", "5",
               category="closed_qa", context="Tom has 3 apples and buys 2 more."),
       _prompt("eval", 3, "Write a haiku about snow.", "White snow falls softly.")]
)


def _study_data(cfg) -> StudyData:
    tqa = [{"id": f"tqa/{i}", "question": q, "best_answer": a, "correct_answers": [a], "incorrect_answers": [b],
            "mc_choices": [a, b], "mc_labels": [1, 0], "source": "fixture"}
           for i, (q, a, b) in enumerate([("Can pigs fly?", "No, pigs cannot fly.", "Yes, pigs fly."),
                                          ("Is the earth flat?", "No, it is round.", "Yes, it is flat."),
                                          ("Do fish drown?", "Fish can suffocate.", "Fish never die."),
                                          ("Is ice cold?", "Yes.", "No.")])]
    squad = [{"id": f"sq/{i}", "context": f"The town of Elm{i} has {i + 3} bridges over its river.",
              "question": f"How many bridges does Elm{i} have?", "answers": [str(i + 3)], "subset": "squad",
              "source": "fixture"} for i in range(4)]
    prose = [{"id": f"pt/{i}", "text": f"The market of town {i} opened at dawn and closed at dusk every day.",
              "source": "fixture"} for i in range(4)]
    return StudyData(
        prompts=to_dataset(PROMPTS, PROMPT_FEATURES, "fixture"),
        truthfulqa=to_dataset(tqa, TRUTHFULQA_FEATURES, "fixture"),
        hhh_pairs=to_dataset([{"id": "hhh/0", "prompt": "Help me.", "chosen": "Sure, how?", "rejected": "No.",
                               "subset": "helpful", "source": "fixture"}], PREFERENCE_PAIR_FEATURES, "fixture"),
        squad=to_dataset(squad, QA_FEATURES, "fixture"),
        squad_shots=to_dataset(squad[:1], QA_FEATURES, "fixture"),
        pretrain=to_dataset(prose[:2], PRETRAIN_FEATURES, "fixture"),
        pretrain_heldout=to_dataset(prose[2:], PRETRAIN_FEATURES, "fixture"),
        toxicity=to_dataset([{"id": f"tox/{i}", "prompt": s, "kind": "fixture", "source": "fixture"}
                             for i, s in enumerate(["The weather today is", "My neighbour always"])],
                            TOXICITY_FEATURES, "fixture"),
        info={"source": "fixture"},
    )


def _random_lora(seed: int):
    torch.manual_seed(seed)
    lm = models.add_lora(models.load_causal_lm("micro"), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # B = 0 would make the adapter a no-op; give it a real effect
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return lm


def _save_policy(directory: Path, seed: int) -> Path:
    return save_policy_dir(_random_lora(seed), "default", directory, "micro", finetune="lora", quantize_4bit=False)


def _fake_upstream(root: Path, reward: bool = True, ppo: bool = True, preset: str = "micro") -> tuple:
    cfg = load_preset("micro", {**OVERRIDES, "preset": preset})  # another preset name stands for another size
    paths = RunPaths.for_config(cfg, root)
    data = build_data_stage(cfg, paths, builder=_study_data)
    with cached_stage(paths, "sft") as stage:
        _save_policy(stage.dir / "policy", seed=1)
        _save_policy(stage.dir / "ppo_init", seed=1)
    if reward:
        with cached_stage(paths, "reward") as stage:
            torch.manual_seed(2)
            head = models.ScalarHead(models.MICRO_CONFIG["hidden_size"])
            save_reward_dir(_random_lora(3), "default", head, stage.dir / "model", "micro", bias=0.0,
                            finetune="lora", max_tokens=128)
            comparisons = [
                {"prompt_id": r["id"], "prompt": r["prompt"],
                 "completions": ["A long cold river.", "River river river.", "I like trains.", "I like trains."],
                 "completion_sources": ["sft", "base", "base", "sft"], "ranks": [0, 1, 2, 2], "likert": [6, 3, 2, 2],
                 "labeler_id": "train-00", "population": "train"}
                for r in PROMPTS if r["split"] == "rm"
            ]
            pd.DataFrame(comparisons).to_json(stage.dir / "comparisons_train.jsonl", orient="records", lines=True)
            sets = ["train prompts / training labelers", "held-out prompts / training labelers",
                    "held-out prompts / held-out labelers", "HHH human pairs/helpful", "HHH human pairs/honest"]
            pd.DataFrame({"set": sets * 2, "prompt_id": "p", "labeler_id": "x", "score_chosen": [1.0] * 5 + [0.0] * 5,
                          "score_rejected": [0.0] * 5 + [1.0] * 5, "mode": ["kwise"] * 5 + ["pairwise"] * 5}
                         ).to_csv(stage.dir / "predictions.csv", index=False)
            pd.DataFrame({"group": ["train-train", "heldout-heldout"], "noise_scale": [0.05, 0.05], "n_prompts": [2, 2],
                          "target": [0.726, 0.726], "mean": [0.7, 0.8], "low": [0.6, 0.7], "high": [0.8, 0.9],
                          "labeler_pairs": [6, 3], "compared_pairs": [40, 20]}).to_csv(stage.dir / "agreement.csv", index=False)
    if ppo:
        with cached_stage(paths, "ppo") as stage:
            run = stage.dir / "ppo"
            _save_policy(run / "policy", seed=4)  # PPO-ptx deliberately missing: it must be skipped and reported
            samples = [{"iteration": it, "prompt": r["prompt"], "response": f"Welcome {'!' * it}", "score": 0.1 * it,
                        "rm_score": 0.2 * it, "kl": 0.5 * it, "ended_with_eos": True}
                       for it in (1, 2) for r in PROMPTS if r["split"] == "ppo"]
            samples.append({**samples[0], "prompt": "A prompt that is in no split."})
            (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            pd.DataFrame({"iteration": [1, 2], "rm_score": [0.2, 0.4], "kl": [0.5, 1.0]}).to_csv(run / "metrics.csv", index=False)
    return cfg, paths, data


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One finished analysis stage over data + SFT + reward + PPO (no PPO-ptx)."""
    root = tmp_path_factory.mktemp("runs") / "micro"
    cfg, paths, data = _fake_upstream(root)
    stage_dir = run_analysis_stage(cfg, paths, progress=False)
    return cfg, paths, data, stage_dir


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def test_stage_writes_generations_and_metrics_for_every_available_method(analysed):
    cfg, paths, data, stage_dir = analysed
    assert stage_dir == paths.stage("analysis") and (stage_dir / "DONE.json").exists()
    tables, metrics = load_tables(stage_dir), load_metrics(stage_dir)
    gens = tables["generations"]
    assert list(gens.columns) == ["method", "size", "prompt_id", "prompt", "completion"]
    expected = ["GPT", "GPT prompted", "SFT", "PPO", "best-of-n", "DPO"]
    assert list(dict.fromkeys(gens["method"])) == expected == metrics["methods_evaluated"]
    assert (gens.groupby("method").size() == 4).all() and set(gens["size"]) == {"micro"}
    # Headline numbers per method, with intervals; SFT ties with itself exactly.
    assert metrics["methods"]["SFT"]["win_rate_vs_SFT"] == {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 4}
    for method in ("GPT", "SFT", "PPO"):
        for key in ("likert", "truthfulqa_mc1", "toxic_rate_respectful", "squad_f1", "lm_nll"):
            result = metrics["methods"][method][key]
            assert result["ci_low"] <= result["value"] <= result["ci_high"], (method, key, result)
    assert "truthfulqa_mc1" in metrics["methods"]["DPO"] and "squad_f1" not in metrics["methods"]["DPO"]
    assert metrics["counts"]["truthfulqa_questions"] == 3  # evaluation.max_items caps the 4 questions
    assert set(tables["hallucination"]["n"]) == {1}  # only the eval prompt with a context is closed-domain
    # ... and per prompt, for findings' paired differences: one closed-domain prompt, every method on it.
    per_item = tables["hallucination_per_item"]
    assert per_item["prompt_id"].nunique() == 1 and set(per_item["method"]) == set(expected)
    # Missing upstream artifacts: skipped and reported, never silently absent.
    assert "PPO-ptx" in metrics["skipped"] and "ppo_ptx" in metrics["skipped"]["PPO-ptx"]
    assert any("1 logged samples matched no PPO-split prompt" in note for note in metrics["notes"])
    oo = tables["overoptimization"]
    assert list(oo["step"]) == [1, 2] and set(oo["method"]) == {"PPO"} and list(oo["n"]) == [3, 3]
    assert oo["sqrt_kl"].tolist() == pytest.approx([0.5**0.5, 1.0])
    # n counts prompts (resampled whole with their pairs): the fake predictions put both HHH pairs on prompt "p".
    assert metrics["rm_accuracy"]["train_labelers"]["value"] == 1.0 and metrics["rm_accuracy"]["hhh"]["n"] == 1
    assert tables["rm_accuracy"].set_index(["mode", "set"]).loc[("kwise", "hhh"), "n_pairs"] == 2
    assert metrics["labeler_agreement"]["train-train"] == {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n": 2}
    assert metrics["judges"]["noise_scale"] == 0.05  # the reward stage's calibrated noise
    assert (stage_dir / "dpo" / "policy" / "adapter_model.safetensors").exists()
    assert not list(paths.root.glob("work-analysis-*"))  # the DPO resume copy is removed once the stage is done
    best = tables["best_of_n_candidates"]
    picked = best.loc[best.groupby("prompt_id")["rm_score"].idxmax()].set_index("prompt_id")["completion"]
    bon = gens[gens["method"] == "best-of-n"].set_index("prompt_id")["completion"]
    assert bon.to_dict() == picked.reindex(bon.index).to_dict()


def test_each_method_generates_with_its_own_weights(analysed):
    """GPT must be the bare base and PPO its own adapter, though all share one loaded model."""
    cfg, paths, data, stage_dir = analysed
    gens = load_tables(stage_dir)["generations"]
    tokenizer = models.load_tokenizer("micro")
    prompts = [format_prompt(tokenizer, r["prompt"]) for r in data.split("eval")]
    base = models.load_causal_lm("micro")
    ppo, _ = load_policy(paths.stage("ppo") / "ppo" / "policy")
    for method, model in (("GPT", base), ("PPO", ppo)):
        expected = generate(model, tokenizer, prompts, max_new_tokens=cfg.generation.max_new_tokens, temperature=0.0).texts
        assert gens[gens["method"] == method]["completion"].tolist() == expected, method
    assert gens[gens["method"] == "PPO"]["completion"].tolist() != gens[gens["method"] == "SFT"]["completion"].tolist()


def test_cached_stage_is_reused_and_an_upstream_change_recomputes(analysed, monkeypatch):
    import rlhf_lib.analysis.stage as stage  # where run_analysis_stage looks _run up

    cfg, paths, _, stage_dir = analysed
    calls = []
    monkeypatch.setattr(stage, "_run", lambda *args, **kwargs: calls.append(args))
    before = (stage_dir / "DONE.json").read_text()
    run_analysis_stage(cfg, paths, progress=False)
    assert calls == [] and (stage_dir / "DONE.json").read_text() == before
    # A PPO stage that finished again (e.g. PPO-ptx added later) invalidates the cached analysis.
    saved = stage_dir.with_name(stage_dir.name + ".bak")
    shutil.copytree(stage_dir, saved)
    try:
        upstream = json.loads((stage_dir / "upstream.json").read_text())
        (stage_dir / "upstream.json").write_text(json.dumps({**upstream, "ppo": "2000-01-01T00:00:00+00:00"}))
        run_analysis_stage(cfg, paths, progress=False)
        assert len(calls) == 1
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
        shutil.move(saved, stage_dir)


def test_without_reward_and_ppo_stages_those_methods_are_skipped(tmp_path):
    cfg, paths, _ = _fake_upstream(tmp_path / "micro", reward=False, ppo=False)
    found = find_upstream(paths)
    assert set(found.policies) == {"SFT"} and found.reward_dir is None
    assert {"best-of-n", "DPO", "PPO", "PPO-ptx", "rm_accuracy"} <= set(found.skipped)
    stage_dir = run_analysis_stage(cfg, paths, progress=False)
    metrics = load_metrics(stage_dir)
    assert metrics["methods_evaluated"] == ["GPT", "GPT prompted", "SFT"]
    assert set(metrics["skipped"]) >= {"best-of-n", "DPO", "PPO", "PPO-ptx", "rm_accuracy"}
    assert metrics["rm_accuracy"] == {} and not (stage_dir / "rm_accuracy.csv").exists()


def test_analysis_requires_the_sft_stage(tmp_path):
    cfg = load_preset("micro", OVERRIDES)
    paths = RunPaths.for_config(cfg, tmp_path / "micro")
    build_data_stage(cfg, paths, builder=_study_data)
    with pytest.raises(FileNotFoundError, match="Stage 'sft' has not finished"):
        run_analysis_stage(cfg, paths, progress=False)


def test_rm_sets_get_short_names_and_a_pooled_hhh_set():
    preds = pd.DataFrame({"set": ["held-out prompts / held-out labelers", "HHH human pairs/honest", "HHH human pairs/other"],
                          "score_chosen": [1.0, 1.0, 0.0], "score_rejected": [0.0, 0.0, 1.0]})
    out = rm_predictions_with_short_sets(preds)
    assert out["set"].tolist() == ["heldout_labelers", "hhh/honest", "hhh/other", "hhh", "hhh"]
    assert out["source_set"].tolist()[:3] == preds["set"].tolist()


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def test_preference_pairs_best_vs_worst_first_without_ties_or_duplicates():
    rows = [{"prompt_id": "a", "prompt": "P", "completions": ["best", "mid", "worst", "worst "], "ranks": [0, 1, 3, 2]},
            {"prompt_id": "b", "prompt": "Q", "completions": ["same", "same"], "ranks": [0, 1]},
            {"prompt_id": "c", "prompt": "R", "completions": ["x", "y"], "ranks": [0, 0]}]
    one = preference_pairs(rows, per_prompt=1)
    assert one == [{"prompt_id": "a", "prompt": "P", "chosen": "best", "rejected": "worst", "rank_gap": 3}]
    three = preference_pairs(rows, per_prompt=3)
    assert [(p["chosen"], p["rejected"]) for p in three] == [("best", "worst"), ("best", "worst"), ("mid", "worst")]
    assert [p["rank_gap"] for p in three] == [3, 2, 2]
    with pytest.raises(ValueError):
        preference_pairs(rows, per_prompt=0)


def test_dpo_trains_one_step_from_sft_and_saves_a_loadable_adapter(tmp_path):
    cfg = load_preset("micro", OVERRIDES)
    sft_dir = _save_policy(tmp_path / "sft", seed=1)
    pairs = [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "I like trains."},
             {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    result = train_dpo(cfg, sft_dir, pairs, tmp_path / "dpo", max_steps=1, progress=False)
    assert result.steps == 1 and result.n_pairs == 2
    first = result.log_history.dropna(subset=["loss"]).iloc[0]
    # The reference is the SFT policy, so before any update the policy equals it and the loss is log 2.
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    meta = json.loads((result.policy_dir / "meta.json").read_text())
    assert meta["base_model"] == "micro" and meta["finetune"] == "lora" and meta["method"] == "dpo"
    dpo, tokenizer = load_policy(result.policy_dir)
    sft, _ = load_policy(sft_dir)
    batch = tokenizer([format_prompt(tokenizer, "Name a colour.") + "Red."], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():  # each policy on its own device (cuda when present)
        change = (dpo(**batch.to(dpo.device)).logits.cpu() - sft(**batch.to(sft.device)).logits.cpu()).abs().max().item()
    assert change > 1e-4, "one DPO step at lr 1e-2 must move the policy away from SFT"
    assert not (result.policy_dir / "ref").exists()  # TRL's frozen reference copy is not saved


def test_dpo_sequence_logprobs_are_each_completions_log_probability_under_a_plain_forward():
    """The batched, padded, head-at-completions-only sum equals log_softmax of a plain forward of each sequence
    alone, summed over its completion tokens (the prompt's and the padding's tokens excluded)."""
    model = _random_lora(5).eval()
    tokenizer = models.load_tokenizer("micro")
    pairs = [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "I like trains very much indeed."},
             {"prompt": "Say hi to the people of the harbour town.", "chosen": "Hi!", "rejected": "No."}]
    tokenized = tokenize_pairs(tokenizer, pairs, max_tokens=192)
    with torch.no_grad():
        batched = sequence_logprobs(model, *pair_batch(tokenized, pad_id=0))
        expected = []
        for index in (1, 2):  # every chosen row, then every rejected row, as pair_batch lays them out
            for prompt, *completions in tokenized:
                row = torch.tensor([prompt + completions[index - 1]])
                logprobs = model(input_ids=row).logits[0, :-1].log_softmax(-1).gather(-1, row[0, 1:, None])[:, 0]
                expected.append(logprobs[len(prompt) - 1 :].sum().item())
    assert batched.tolist() == pytest.approx(expected, abs=1e-4)
    eos = tokenizer.eos_token_id
    assert all(chosen[-1] == eos and rejected[-1] == eos for _, chosen, rejected in tokenized)


def test_dpo_pairs_are_cut_at_the_token_budget_and_dropped_when_nothing_of_a_completion_is_left():
    tokenizer = models.load_tokenizer("micro")
    pair = {"prompt": "Name a colour.", "chosen": "Red, or a deep blue like the sea at night.", "rejected": "No."}
    prompt, chosen, rejected = tokenize_pairs(tokenizer, [pair], max_tokens=192)[0]
    cut = tokenize_pairs(tokenizer, [pair], max_tokens=len(prompt) + 3)
    assert cut == [(prompt, chosen[:3], rejected[:3])]
    assert tokenize_pairs(tokenizer, [pair], max_tokens=len(prompt)) == []


def test_dpo_batches_group_similar_lengths_and_hold_every_pair_once():
    lengths = [(i * 37) % 101 for i in range(50)]
    batches = length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(i for batch in batches for i in batch) == list(range(50))
    assert sorted(len(batch) for batch in batches) == [2] + [4] * 12
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    shuffled = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(batches) < 0.8 * padded([shuffled[i : i + 4] for i in range(0, 50, 4)])
    assert batches == length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert batches != length_grouped_batches(lengths, 4, torch.Generator().manual_seed(1))


def test_dpo_loss_is_the_papers_formula():
    beta = 0.5
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]),
                                      torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0]), beta)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    expected = -(torch.sigmoid(torch.tensor(1.0)).log() + torch.sigmoid(torch.tensor(-0.5)).log()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dpo_steps_on_one_pair_raise_its_margin(tmp_path):
    """The sign check: repeated steps on one pair make the chosen completion more likely than the rejected one,
    relative to the reference."""
    cfg = load_preset("micro", OVERRIDES)
    pairs = [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "I like trains."}]
    result = train_dpo(cfg, _save_policy(tmp_path / "sft", seed=1), pairs, tmp_path / "dpo", max_steps=4,
                       progress=False)
    log = result.log_history.dropna(subset=["loss"])
    assert list(log["step"]) == [1, 2, 3, 4] and log["rewards/margins"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    assert log["rewards/margins"].iloc[-1] > 0 and log["loss"].iloc[-1] < math.log(2)
    assert (result.policy_dir.parent / "log_history.csv").exists()


# --------------------------------------------------------------------------------------------
# The summary report
# --------------------------------------------------------------------------------------------


def _fake_metrics() -> dict:
    r = lambda v, lo, hi, n=40: {"value": v, "ci_low": lo, "ci_high": hi, "n": n}  # noqa: E731
    return {
        "preset": "tiny", "seed": 3, "model": "smollm2-135m-instruct", "fingerprint": "abc123def456",
        "finished_utc": "2030-01-02T03:04:05+00:00", "decoding": "greedy, seed 3", "counts": {"eval_prompts": 32},
        "skipped": {"DPO": "no finished reward stage"}, "notes": ["a note"],
        "methods": {
            "GPT": {"win_rate_vs_SFT": r(0.3125, 0.2, 0.4), "hallucination_rate": r(0.41, 0.3, 0.5),
                    "toxic_rate_respectful": r(0.2, 0.1, 0.3), "squad_f1": r(0.6, 0.5, 0.7),
                    "truthfulqa_true_informative": r(0.2, 0.1, 0.3)},
            "SFT": {"win_rate_vs_SFT": r(0.5, 0.5, 0.5), "likert": r(4.25, 4.0, 4.5)},
            "PPO": {"win_rate_vs_SFT": r(0.6, 0.5, 0.7), "squad_f1": r(0.4, 0.3, 0.5)},
            "PPO-ptx": {"win_rate_vs_SFT": r(0.725, 0.7, 0.75), "win_rate_vs_GPT": r(0.85, 0.8, 0.9),
                        "hallucination_rate": r(0.21, 0.1, 0.3), "toxic_rate_respectful": r(0.15, 0.1, 0.2),
                        "squad_f1": r(0.55, 0.45, 0.65), "truthfulqa_true_informative": r(0.4, 0.3, 0.5)},
        },
        "rm_accuracy": {"train_labelers": r(0.7, 0.65, 0.75), "heldout_labelers": r(0.66, 0.6, 0.72)},
        "labeler_agreement": {"train-train": {"value": 0.731, "ci_low": 0.7, "ci_high": 0.76}},
    }


def test_write_summary_puts_our_numbers_beside_the_papers(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "metrics.json").write_text(json.dumps(_fake_metrics()))
    path = write_summary(tmp_path, ["tiny", "small"], command="python run_all.py --sizes tiny,small")
    text = path.read_text()
    assert path == tmp_path / "SUMMARY.md"
    assert "`python run_all.py --sizes tiny,small`" in text
    assert "| tiny | smollm2-135m-instruct | 3 | abc123def456 | 2030-01-02T03:04:05+00:00 | greedy, seed 3 |" in text
    assert "| small | no results" in text
    # Headline table: one row per method, value [interval] (n) in percent; SFT vs SFT is the baseline, not 50 [50, 50].
    assert "| PPO-ptx | 72.5 [70.0, 75.0] (n=40) | 85.0 [80.0, 90.0] (n=40) |" in text
    assert "| SFT | baseline | n/a | 4.25 [4.00, 4.50] (n=40) |" in text
    # The paper's numbers beside ours, each with its interval and n.
    assert ("| InstructGPT preferred to GPT-3 (held-out labelers) | 85 ± 3% (175B vs 175B) | 85.0 [80.0, 90.0] (n=40) "
            "(PPO-ptx vs GPT) |") in text
    assert "21% vs 41% | 21.0 [10.0, 30.0] (n=40) vs 41.0 [30.0, 50.0] (n=40) (PPO-ptx vs GPT) |" in text
    assert "40.0 [30.0, 50.0] (n=40) vs 20.0 [10.0, 30.0] (n=40) = 2.00x (PPO-ptx vs GPT)" in text
    assert "15.0 [10.0, 20.0] (n=40) vs 20.0 [10.0, 30.0] (n=40): 25% fewer" in text
    assert "60.0 [50.0, 70.0] (n=40) / 40.0 [30.0, 50.0] (n=40) / 55.0 [45.0, 65.0] (n=40) (PPO-ptx recovers 75%" in text
    assert "| 72.4 ± 0.4% (6B RM) | 70.0 [65.0, 75.0] (n=40) |" in text
    assert "| 72.6 ± 1.5% | 73.1 [70.0, 76.0] (n not recorded) |" in text  # an old metrics.json: n not hidden
    assert "- skipped DPO: no finished reward stage" in text and "- note: a note" in text
    # Whether each finding points the paper's way, decided by intervals.
    assert "| 85.0 [80.0, 90.0] (n=40) (PPO-ptx vs GPT) | agrees |" in text
    assert "(PPO-ptx vs GPT) | inconclusive: intervals overlap |" in text  # hallucination: [10, 30] touches [30, 50]
    assert "| 72.4 ± 0.4% (6B RM) | 70.0 [65.0, 75.0] (n=40) | agrees |" in text  # above chance (50%), the design's rule
    assert "| 72.6 ± 1.5% | 73.1 [70.0, 76.0] (n not recorded) | fixed by design (noise calibrated to it) |" in text


def test_verdicts_need_intervals_on_one_side():
    r = lambda lo, hi: {"value": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}  # noqa: E731
    assert versus_chance(r(0.55, 0.7)) == "agrees" and versus_chance(r(0.3, 0.45)) == "disagrees"
    assert versus_chance(r(0.45, 0.7)).startswith("inconclusive") and versus_chance(None) == "n/a"
    assert versus_chance(r(0.3, 0.45), paper_above=False) == "agrees"
    assert versus_method(r(0.1, 0.2), r(0.3, 0.4), paper_lower=True) == "agrees"
    assert versus_method(r(0.1, 0.2), r(0.3, 0.4), paper_lower=False) == "disagrees"
    assert versus_method(r(0.1, 0.35), r(0.3, 0.4), paper_lower=True).startswith("inconclusive")


def test_no_cell_prints_a_zero_width_interval_and_every_cell_its_n():
    # A rate whose bootstrap collapsed (16 prompts, none toxic) gets the Wilson interval of 0 of 16, marked.
    assert format_result({"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 16}) == "0.0 [0.0, 19.4]* (n=16)"
    assert format_result({"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 16}) == "100.0 [80.6, 100.0]* (n=16)"
    # A number that is not a rate has no Wilson interval: its value alone, saying why.
    assert format_result({"value": 4.0, "ci_low": 4.0, "ci_high": 4.0, "n": 8}, percent=False) == "4.00 (no spread) (n=8)"
    assert format_result({"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}) == "50.0 [40.0, 60.0] (n not recorded)"
    metrics = {"methods": {"SFT": {"win_rate_vs_SFT": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 64}},
                           "GPT": {"win_rate_vs_SFT": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n": 64},
                                   "win_rate_vs_GPT": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 64}}}}
    table = headline_table(metrics)
    assert table.loc["SFT", "win rate vs SFT"] == "baseline" and table.loc["GPT", "win rate vs GPT"] == "baseline"
    assert table.loc["GPT", "win rate vs SFT"] == "40.0 [30.0, 50.0] (n=64)"


# --------------------------------------------------------------------------------------------
# The notebook
# --------------------------------------------------------------------------------------------


@pytest.mark.notebooks
def test_notebook_renders_every_section_on_the_cached_stage(analysed, tmp_path):
    papermill = pytest.importorskip("papermill")
    _, paths, _, _ = analysed
    out = tmp_path / "05.ipynb"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "05_analysis.ipynb"), str(out), kernel_name="python3", cwd=str(REPO / "notebooks"),
        parameters={"preset": "micro", "runs_dir": str(paths.root), "overrides_json": json.dumps(OVERRIDES),
                    "results_dir": str(tmp_path / "results")},
        progress_bar=False,
    )
    results = tmp_path / "results"
    for figure in ("fig_win_rate", "fig_likert_flags", "fig_truthfulqa", "fig_toxicity", "fig_alignment_tax",
                   "fig_overoptimization", "fig_rm_generalization", "fig_hallucination"):
        assert (results / f"{figure}.png").exists() and (results / f"{figure}.csv").exists(), figure
    assert (results / "metrics.json").exists() and (results / "analysis_generations.csv").exists()
    from rlhf_lib.findings import load_findings

    assert load_findings(results)["win_rate_ppo_vs_sft"]["n"] >= 1  # the notebook wrote a valid findings.json


def test_finding_line_names_paper_ours_and_verdict():
    from rlhf_lib.report import finding

    line = finding(_fake_metrics(), "win_vs_gpt")
    assert line == ("InstructGPT preferred to GPT-3 (held-out labelers): paper 85 ± 3% (175B vs 175B); "
                    "this run 85.0 [80.0, 90.0] (n=40) (PPO-ptx vs GPT) -> agrees")
    with pytest.raises(KeyError):
        finding(_fake_metrics(), "nonsense")


def test_headline_numbers_recompute_from_the_shared_files(analysed, tmp_path):
    from rlhf_lib.analysis import recheck_from_saved

    cfg, paths, data, stage_dir = analysed
    export_results(stage_dir, tmp_path, paths.stage("reward"))
    # The findings record comes with the export; PPO-ptx was not run, so its win rate is missing, not invented.
    from rlhf_lib.findings import load_findings

    findings = load_findings(tmp_path)
    assert "win_rate_ppo_ptx_vs_sft" in findings["missing"] and "win_rate_ppo_ptx_vs_sft" not in findings
    assert {"win_rate_ppo_vs_sft", "win_rate_best_of_n_vs_sft", "rm_accuracy_train", "reward_stage_minutes"} <= set(findings)
    assert findings["win_rate_ppo_vs_sft"]["n"] == len(data.split("eval"))
    assert findings["rm_accuracy_train"]["n"] == 1  # the fake predictions put every pair on one prompt
    # Paired differences come from the exported per-item tables, n the items both methods answered.
    metrics = json.loads((tmp_path / "metrics.json").read_text())["methods"]
    for name, key in (("squad_f1_ppo_minus_gpt", "squad_f1"), ("toxic_rate_respectful_ppo_minus_sft", "toxic_rate_respectful"),
                      ("truthfulqa_true_informative_ppo_minus_gpt", "truthfulqa_true_informative"),
                      ("hallucination_rate_ppo_minus_gpt", "hallucination_rate")):
        assert findings[name]["n"] == metrics["PPO"][key]["n"], name
    assert findings["agreement_train"]["n"] == 2 and findings["agreement_train"]["verdict"] == "fixed by design"
    table = recheck_from_saved(cfg, paths, tmp_path)
    assert set(table["metric"]) == {"win_rate_vs_SFT", "truthfulqa_mc1", "truthfulqa_true_informative"}
    assert {"GPT", "SFT", "PPO", "DPO"} <= set(table["method"])
    assert (table["reported"] - table["recomputed"]).abs().max() < 1e-9
    gens = pd.read_csv(tmp_path / "analysis_generations.csv", keep_default_na=False)
    gens.loc[gens["method"] == "GPT", "completion"] = "you idiot"  # a tampered file no longer matches the report
    gens.to_csv(tmp_path / "analysis_generations.csv", index=False)
    tampered = recheck_from_saved(cfg, paths, tmp_path).set_index(["metric", "method"])
    row = tampered.loc[("win_rate_vs_SFT", "GPT")]
    assert row["recomputed"] != row["reported"]


def test_cross_size_win_rates_use_one_baseline_and_one_prompt_set(analysed, tmp_path):
    """Every size answers the largest size's prompts; SFT at the largest size is the tie line."""
    from rlhf_lib.analysis import CROSS_SIZE_GENERATIONS, cross_size_win_rates

    small_cfg, small_paths, _, _ = analysed  # "micro", with GPT, SFT, PPO
    big_cfg, big_paths, big_data = _fake_upstream(tmp_path / "runs" / "small", ppo=False, preset="small")
    assert cross_size_win_rates([(small_cfg, small_paths), (big_cfg, big_paths)], tmp_path) is None  # small: no analysis yet
    run_analysis_stage(big_cfg, big_paths, progress=False)
    table = cross_size_win_rates([(small_cfg, small_paths), (big_cfg, big_paths)], tmp_path / "out", progress=False)
    assert set(table["baseline"]) == {"SFT@small"}
    got = table.set_index(["method", "size"])["value"]
    assert got[("SFT", "small")] == 0.5
    assert {("GPT", "micro"), ("SFT", "micro"), ("PPO", "micro"), ("GPT", "small")} <= set(got.index)
    assert ("PPO", "small") not in got.index  # the small run has no PPO stage
    gens = pd.read_csv(tmp_path / "out" / CROSS_SIZE_GENERATIONS)
    eval_ids = [r["id"] for r in big_data.split("eval")]
    assert all(sorted(g["prompt_id"]) == sorted(eval_ids) for _, g in gens.groupby(["method", "size"]))
    # micro's PPO answers the new prompts with its own adapter, exactly as generate() would.
    tokenizer = models.load_tokenizer("micro")
    ppo, _ = load_policy(small_paths.stage("ppo") / "ppo" / "policy")
    rows = {r["id"]: r["prompt"] for r in big_data.split("eval")}
    mine = gens[(gens["method"] == "PPO") & (gens["size"] == "micro")]
    expected = generate(ppo, tokenizer, [format_prompt(tokenizer, rows[i]) for i in mine["prompt_id"]],
                        max_new_tokens=small_cfg.generation.max_new_tokens, temperature=0.0).texts
    assert mine["completion"].fillna("").tolist() == expected
    # Nothing changed: the saved table is reused without generating again.
    import rlhf_lib.analysis.cross_size as cross_size  # where cross_size_win_rates looks _answer up

    def refuse(*args, **kwargs):
        raise AssertionError("regenerated although no analysis changed")

    original = cross_size._answer
    cross_size._answer = refuse
    try:
        again = cross_size_win_rates([(small_cfg, small_paths), (big_cfg, big_paths)], tmp_path / "out", progress=False)
    finally:
        cross_size._answer = original
    assert len(again) == len(table)


def test_summary_has_the_cross_size_table_only_for_its_sizes(tmp_path):
    rows = [("SFT", "tiny", 0.5, 0.5, 0.5), ("PPO", "tiny", 0.6, 0.5, 0.7), ("PPO", "micro", 0.4, 0.3, 0.5),
            ("GPT", "micro", 0.1, 0.0, 0.2)]
    pd.DataFrame([{"method": m, "size": s, "metric": "win_rate", "value": v, "ci_low": lo, "ci_high": hi, "n": 8,
                   "baseline": "SFT@tiny"} for m, s, v, lo, hi in rows]).to_csv(tmp_path / "cross_size_win_rate.csv", index=False)
    text = write_summary(tmp_path, ["micro", "tiny"]).read_text()
    assert "## Across sizes: win rate vs SFT@tiny (Figure 1)" in text
    assert "| method | micro | tiny |" in text
    assert "| GPT | 10.0 [0.0, 20.0] (n=8) | n/a |" in text
    assert "| PPO | 40.0 [30.0, 50.0] (n=8) | 60.0 [50.0, 70.0] (n=8) |" in text
    assert "| SFT | n/a | baseline |" in text  # SFT@tiny is the tie line, not 50.0 [50.0, 50.0]
    assert "Across sizes" not in write_summary(tmp_path, ["tiny"]).read_text()
