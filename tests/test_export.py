"""rlhf_lib.export at micro: merged policies give our logits, the RM classifier gives our scores (or is refused
for a reason), the comparisons dataset has every untied pair the right way round, the cards say what is known,
and nothing touches the network unless --push-to-hub asks."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from test_reward import _toy_comparisons

from rlhf_lib import export, models
from rlhf_lib.artifacts import RewardModel, load_policy, save_policy_dir
from rlhf_lib.config import load_preset
from rlhf_lib.export import command
from rlhf_lib.pipeline import DONE, RunPaths
from rlhf_lib.reward import new_reward_model, ranked_pairs

PROMPTS = ["Name a colour.", "Write one long sentence about rivers, the sea and the town by the harbour.", "Why?", "Hi"]
ANSWERS = ["Red.", "The river runs past the market to the harbour and out to the grey sea.", "Because.", ""]
ENDED = [True, False, True, False]  # a cut answer gets no EOS; the last one is empty as well
TASKS = ["natural_instructions", "truthful_qa"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro ops are tiny: a second thread on 2 shared cores only waits
    yield
    torch.set_num_threads(threads)


def _random_lora(seed: int, model=None):
    """A LoRA adapter with a real effect (peft starts B at zero, which would make merging trivially right)."""
    torch.manual_seed(seed)
    lm = model if model is not None else models.add_lora(models.load_causal_lm("micro", device="cpu"), rank=4, alpha=8)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return lm


def _reward_model(layer: int, pooling: str, seed: int = 3, max_tokens: int = 224) -> RewardModel:
    """A micro RM as the study builds one (SFT-like LoRA body + head), with a non-zero head bias and demo bias."""
    cfg = load_preset("micro", {"reward.pooling": pooling, "reward.max_seq_tokens": max_tokens})
    rm = new_reward_model(cfg, trainable=False)
    _random_lora(seed, rm.model)
    torch.manual_seed(seed)
    with torch.no_grad():
        rm.head.linear.weight.normal_(0.0, 0.5)
        rm.head.linear.bias.fill_(0.3)
    rm.layer, rm.bias = layer, 0.25
    return rm


def _cached_head_rm(tmp_path: Path, layer: int) -> Path:
    """The CPU path for real: features of the frozen body at `layer`, a K-wise head fitted on them, saved."""
    from rlhf_lib.reward import build_feature_table, head_from_fit, ranked_units, train_cached_head

    cfg = load_preset("micro", {"reward.head_max_epochs": 5, "reward.pooling": "last"})
    rm = new_reward_model(cfg, trainable=False)
    _random_lora(5, rm.model)
    rows = _toy_comparisons(4)
    for row in rows:
        row["completion_ended"] = [True, False, True, True]
    texts = [(r["prompt"], c, e) for r in rows for c, e in zip(r["completions"], r["completion_ended"], strict=True)]
    table = build_feature_table(rm, texts, batch_size=4, layers=[layer], progress=False)
    result = train_cached_head(table.features, ranked_units(table, rows), cfg.reward, seed=0)
    rm.head, rm.bias, rm.layer = head_from_fit(result.fit, rm.head), -0.4, result.layer
    rm.save(tmp_path / "rm")
    return tmp_path / "rm"


def _load_classifier(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _assert_scores_equal(rm_dir: Path, out: Path, offset_expected: bool) -> None:
    folder, summary = export.export_reward_model(rm_dir, out)
    assert folder.name == export.REWARD_DIR and "refused" not in summary
    model, tokenizer = _load_classifier(folder)
    ours_rm = RewardModel.load(rm_dir, device="cpu")
    lengths = ours_rm.encode(PROMPTS, ANSWERS, ENDED)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(PROMPTS)  # one batch, every row padded differently
    ours = ours_rm.score_texts(PROMPTS, ANSWERS, ended=ENDED, batch_size=8)
    theirs = export.exported_scores(model, tokenizer, PROMPTS, ANSWERS, ENDED)  # one right-padded batch
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert len(set(ours.round(decimals=4).tolist())) == len(PROMPTS)  # distinct: a mix-up of rows would show
    offset = getattr(model.config, export.SCORE_OFFSET_KEY)
    assert (offset != 0.0) == offset_expected
    raw = model(**tokenizer([export.reward_text(tokenizer, PROMPTS[0], ANSWERS[0])], return_tensors="pt", truncation=True,
                            add_special_tokens=False)).logits[0, 0]
    assert raw.item() + offset == pytest.approx(ours[0].item(), abs=1e-5)  # the documented recipe, by hand


# ============================================================================================
# The reward model
# ============================================================================================


def test_final_layer_rm_scores_equal_ours_with_the_documented_offset(tmp_path):
    rm = _reward_model(layer=-1, pooling="last")
    rm.save(tmp_path / "rm")
    _assert_scores_equal(tmp_path / "rm", tmp_path / "out", offset_expected=True)
    model, _ = _load_classifier(tmp_path / "out" / export.REWARD_DIR)
    # LlamaForSequenceClassification's score has no bias: the constant lives in the config, as the card says.
    assert model.score.bias is None
    assert getattr(model.config, export.SCORE_OFFSET_KEY) == pytest.approx(0.3 - 0.25, abs=1e-6)


@pytest.mark.parametrize("layer", [1, 2])
def test_cached_head_rm_at_each_block_scores_equal_ours(tmp_path, layer):
    """Block 1 of 2 is read before the final norm (the widened, cut body); block 2 is the final layer."""
    _assert_scores_equal(_cached_head_rm(tmp_path, layer), tmp_path / "out", offset_expected=layer == 2)
    config = json.loads((tmp_path / "out" / export.REWARD_DIR / "config.json").read_text())
    assert config["num_hidden_layers"] == layer
    assert config[export.REWARD_INPUT_KEY]["padding_side"] == "right"


def test_rm_input_is_truncated_from_the_left_like_ours(tmp_path):
    rm = _reward_model(layer=1, pooling="last", max_tokens=16)
    rm.save(tmp_path / "rm")
    folder, _ = export.export_reward_model(tmp_path / "rm", tmp_path / "out")
    model, tokenizer = _load_classifier(folder)
    batch = tokenizer([export.reward_text(tokenizer, PROMPTS[1], ANSWERS[1])], truncation=True, add_special_tokens=False)
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "left")
    assert len(batch["input_ids"][0]) == 16  # cut to the RM's length, keeping the end where the score is read
    ours = RewardModel.load(tmp_path / "rm", device="cpu").score_texts(PROMPTS, ANSWERS, ended=ENDED)
    torch.testing.assert_close(export.exported_scores(model, tokenizer, PROMPTS, ANSWERS, ENDED), ours, atol=1e-5, rtol=0)


def test_mean_pooled_rm_is_refused_and_copied_in_our_format_with_a_card_saying_why(tmp_path):
    rm = _reward_model(layer=-1, pooling="mean_response")
    rm.save(tmp_path / "rm")
    folder, summary = export.export_reward_model(tmp_path / "rm", tmp_path / "out")
    assert folder.name == export.REWARD_OWN_FORMAT_DIR and not (tmp_path / "out" / export.REWARD_DIR).exists()
    assert "MEAN" in summary["refused"] and "pooling" in summary["refused"]
    copy = RewardModel.load(folder, device="cpu")  # the copy is a working RM
    torch.testing.assert_close(copy.score_texts(PROMPTS, ANSWERS, ended=ENDED),
                               RewardModel.load(tmp_path / "rm", device="cpu").score_texts(PROMPTS, ANSWERS, ended=ENDED))
    ctx = export.StudyContext("micro", 0, {}, {})
    card = export.reward_card(ctx, summary)
    assert "Not exported as `AutoModelForSequenceClassification`" in card and "RewardModel.load" in card


def test_plan_refuses_what_the_standard_class_cannot_hold():
    assert export.reward_export_plan(-1, "last", 30, "gemma3_text").form == "final_layer"
    assert export.reward_export_plan(15, "last", 30, "llama") == export.RewardPlan("block", 15, 30)
    with pytest.raises(export.ExportRefused, match="Llama"):
        export.reward_export_plan(15, "last", 30, "gemma3_text")
    with pytest.raises(export.ExportRefused, match="MEAN"):
        export.reward_export_plan(30, "mean_response", 30, "llama")


# ============================================================================================
# A whole (constructed) micro study, exported by the command
# ============================================================================================


def _done(stage_dir: Path, paths: RunPaths, stage: str) -> None:
    record = {"stage": stage, "preset": "micro", "seed": 0, "fingerprint": paths.cfg.fingerprint(stage),
              "commit": "abc123", "finished_utc": "2026-12-05T09:00:00+00:00", "config": paths.cfg.to_dict()}
    (stage_dir / DONE).write_text(json.dumps(record))


def _rankings() -> list[dict]:
    rows = _toy_comparisons(3)
    rows[0]["ranks"] = [0, 0, 1, 2]  # a tie: no pair from it
    for i, row in enumerate(rows):
        row |= {"completion_sources": ["sft"] * 4, "completion_temperatures": [0.7] * 4,
                "completion_ended": [True, False, True, True], "likert": [5, 2, 4, 1], "labeler_id": f"L{i % 2}",
                "population": "train"}
    return rows


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> RunPaths:
    """runs/micro/ with finished data, sft, reward and ppo stages built from random adapters (seconds, not minutes)."""
    root = tmp_path_factory.mktemp("runs")
    paths = RunPaths.for_config(load_preset("micro"), root / "micro")
    (paths.data / "study").mkdir(parents=True)
    (paths.data / "study" / "info.json").write_text(json.dumps({"provenance": {"sdist": "bigbench-1.0.0.tar.gz",
                                                                               "tasks": TASKS}, "caps": {"sft": 16}}))
    save_policy_dir(_random_lora(1), "default", paths.sft / "policy", "micro")
    save_policy_dir(_random_lora(2), "default", paths.ppo / "ppo" / "policy", "micro")
    save_policy_dir(_random_lora(3), "default", paths.ppo / "ppo_ptx" / "policy", "micro")
    (paths.ppo / "ppo" / "result.json").write_text(json.dumps({"iterations_done": 5, "chosen_iteration": 3,
                                                               "stop_reason": "collapse guard"}))
    _reward_model(layer=-1, pooling="last").save(paths.reward / "model")
    rankings = _rankings()
    for name, rows in (("train", rankings), ("heldout_trainlabelers", rankings[:2]), ("heldout_heldoutlabelers", rankings[2:])):
        (paths.reward / f"comparisons_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in ("data", "sft", "reward", "ppo"):
        _done(paths.stage(stage), paths, stage)
    return paths


def _findings(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "findings.json").write_text(json.dumps({"rm_accuracy_heldout": {
        "value": 58.86, "low": 54.47, "high": 63.46, "n": 40, "unit": "percent", "n_unit": "prompts",
        "description": "RM accuracy: held-out labelers", "paper": 69.6, "verdict": "agrees"}, "about": "text"}))
    return folder


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory) -> Path:
    """`python -m rlhf_lib.export --size micro` on the constructed study, with every way out to the network shut."""
    out = tmp_path_factory.mktemp("export") / "out"
    results = _findings(tmp_path_factory.mktemp("results"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"the export touched the network: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "create_connection", no_network)
        patch.setattr(command, "push_to_hub", no_network)  # where main looks it up
        status = export.main(["--size", "micro", "--runs-dir", str(study.root.parent), "--out", str(out),
                              "--results-dir", str(results)])
    assert status == 0
    return out


@pytest.mark.parametrize("name,relative", [("sft", "sft/policy"), ("ppo", "ppo/ppo/policy"), ("ppo_ptx", "ppo/ppo_ptx/policy")])
def test_policies_load_as_plain_causal_lms_with_our_logits(study, exported, name, relative):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage, _, rest = relative.partition("/")
    ours, _ = load_policy(study.stage(stage) / rest)
    plain = AutoModelForCausalLM.from_pretrained(exported / name).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported / name)
    assert not any("lora" in key for key in plain.state_dict())  # merged, not an adapter
    assert tokenizer.padding_side == "left"  # as the study generates
    ids = tokenizer(["Name a colour.", "The river runs to the sea"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, ours.eval()(**ids).logits, atol=1e-5, rtol=0)
        base = models.load_causal_lm("micro", device="cpu")(**ids).logits
    assert not torch.allclose(plain(**ids).logits, base, atol=1e-3)  # the adapter did change something


def test_a_fully_fine_tuned_policy_is_saved_as_is(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    full = models.load_causal_lm("micro", device="cpu")
    with torch.no_grad():
        full.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a "fine-tuned" full model, unlike the base
    full.save_pretrained(tmp_path / "policy")
    models.load_tokenizer("micro").save_pretrained(tmp_path / "policy")  # as the study saves a full fine-tune
    (tmp_path / "policy" / "meta.json").write_text(json.dumps({"base_model": "micro", "finetune": "full"}))
    export.export_policy(tmp_path / "policy", tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits,
                                   full(ids).logits, atol=1e-5, rtol=0)


def test_the_command_exports_the_rm_and_records_what_it_did(exported, study):
    report = json.loads((exported / "export.json").read_text())
    assert set(report["exported"]) == {"sft", "ppo", "ppo_ptx", export.REWARD_DIR, export.COMPARISONS_DIR}
    assert report["reward_model"]["form"] == "final_layer" and report["skipped"] == {}
    model, tokenizer = _load_classifier(exported / export.REWARD_DIR)
    ours = RewardModel.load(study.reward / "model", device="cpu").score_texts(PROMPTS, ANSWERS, ended=ENDED)
    torch.testing.assert_close(export.exported_scores(model, tokenizer, PROMPTS, ANSWERS, ENDED), ours, atol=1e-5, rtol=0)


def test_trls_ppo_reward_function_reads_our_scores_from_the_exported_rm(exported, study):
    """TRL's PPO scores query + response with its own positions (left-padded queries, right-padded answers)."""
    from trl.experimental.utils import get_reward

    from rlhf_lib.prompting import format_prompt

    model, tokenizer = _load_classifier(exported / export.REWARD_DIR)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    queries = [ids(format_prompt(tokenizer, p)) for p in PROMPTS]
    answers = [ids(a.strip() + (tokenizer.eos_token if e else "")) for a, e in zip(ANSWERS, ENDED, strict=True)]
    context, width, pad = max(map(len, queries)), max(map(len, answers)) + 1, tokenizer.pad_token_id
    rows = [[pad] * (context - len(q)) + q + a + [pad] * (width - len(a)) for q, a in zip(queries, answers, strict=True)]
    with torch.no_grad():
        _, trl_scores, _ = get_reward(model, torch.tensor(rows), pad, context)
    ours = RewardModel.load(study.reward / "model", device="cpu").score_texts(PROMPTS, ANSWERS, ended=ENDED)
    offset = getattr(model.config, export.SCORE_OFFSET_KEY)
    torch.testing.assert_close(trl_scores + offset, ours, atol=1e-5, rtol=0)


def test_comparisons_hold_every_untied_pair_winner_first(exported, study):
    from datasets import load_dataset, load_from_disk

    pairs = load_from_disk(str(exported / "comparisons" / "arrow" / "pairs"))
    rankings = load_from_disk(str(exported / "comparisons" / "arrow" / "rankings"))
    stage = export.comparison_splits(study.reward)
    assert set(pairs) == set(rankings) == set(stage) == {"train", "heldout_trainlabelers", "heldout_heldoutlabelers"}
    for split, rows in stage.items():
        assert len(rankings[split]) == len(rows)
        assert len(pairs[split]) == sum(len(ranked_pairs(r["ranks"])) for r in rows)
        by_key = {(r["prompt_id"], r["labeler_id"]): r for r in rows}
        for pair in pairs[split]:
            ranking = by_key[(pair["prompt_id"], pair["labeler_id"])]
            rank_of = dict(zip(ranking["completions"], ranking["ranks"], strict=True))
            assert rank_of[pair["chosen"]] < rank_of[pair["rejected"]] and pair["prompt"] == ranking["prompt"]
    assert len(pairs["train"]) == 5 + 6 + 6  # the tied ranking gives 5 of its 6 pairs
    assert {"prompt", "chosen", "rejected"} <= set(pairs["train"].column_names)
    jsonl = load_dataset("json", data_files=str(exported / "comparisons" / "pairs" / "train.jsonl"), split="train")
    assert jsonl.to_list() == pairs["train"].to_list()
    assert rankings["train"][0]["ranks"] == [0, 0, 1, 2] and rankings["train"][0]["labeler_id"] == "L0"


def test_cards_name_the_data_canary_method_findings_and_limits(exported):
    for folder in ("sft", "ppo", "ppo_ptx", export.REWARD_DIR, export.COMPARISONS_DIR):
        card = (exported / folder / "README.md").read_text()
        assert card.startswith("---\n") and all(f"`{task}`" in card for task in TASKS), folder
        assert "canary" in card and "58.9% [54.5, 63.5]" in card and "paper: 69.6" in card, folder
        assert "abc123" in card and "rule-based" in card and "Preset `micro`, seed 0" in card, folder
    assert "16 sft" in card and "Trained 5 iterations; exported iterate: 3; stopped early: collapse guard" in (
        exported / "ppo" / "README.md").read_text()
    rm_card = (exported / export.REWARD_DIR / "README.md").read_text()
    assert export.SCORE_OFFSET_KEY in rm_card and "no EOS" in rm_card
    assert "config_name: pairs" in (exported / "comparisons" / "README.md").read_text()


def test_cards_say_not_available_without_findings():
    ctx = export.StudyContext("micro", 0, {}, {}, data_info={}, findings=None)
    card = export.policy_card("sft", ctx, quantized_study=False)
    assert "Not available" in card and "%" not in card.split("## Findings")[1].split("## Provenance")[0]


def test_push_to_hub_only_with_the_flag_and_with_one_repo_per_artifact(monkeypatch, tmp_path):
    report = {"exported": {name: str(tmp_path / name) for name in ("sft", "ppo", "ppo_ptx", "reward_model", "comparisons")},
              "skipped": {}}
    monkeypatch.setattr(command, "export_study", lambda *args, **kwargs: report)  # where main looks them up
    monkeypatch.setattr(command, "load_preset", load_preset, raising=False)
    calls = []
    monkeypatch.setattr(command, "push_to_hub", lambda folder, repo_id, repo_type, private: calls.append(
        (Path(folder).name, repo_id, repo_type, private)))
    assert export.main(["--size", "micro", "--out", str(tmp_path)]) == 0 and calls == []
    assert export.main(["--size", "micro", "--out", str(tmp_path), "--push-to-hub", "me/study"]) == 0
    assert calls == [("sft", "me/study-sft", "model", True), ("ppo", "me/study-ppo", "model", True),
                     ("ppo_ptx", "me/study-ppo-ptx", "model", True), ("reward_model", "me/study-reward-model", "model", True),
                     ("comparisons", "me/study-comparisons", "dataset", True)]


def test_unfinished_stages_are_skipped_and_said(study, tmp_path):
    """Only data and SFT finished: the SFT policy is exported; PPO, the RM and the comparisons are skipped, saying why."""
    paths = RunPaths.for_config(study.cfg, tmp_path / "runs" / "micro")
    for stage in ("data", "sft"):
        shutil.copytree(study.stage(stage), paths.stage(stage))
    report = export.export_study(paths, tmp_path / "out", tmp_path / "no_results", progress=lambda _: None)
    assert list(report["exported"]) == ["sft"]
    assert set(report["skipped"]) == {"ppo", "ppo_ptx", "reward_model", "comparisons"}
    assert "no finished ppo stage" in report["skipped"]["ppo"]
    assert "Not available" in (tmp_path / "out" / "sft" / "README.md").read_text()  # no findings.json there


def test_a_missing_sft_stage_is_a_clear_error(tmp_path, capsys):
    assert export.main(["--size", "micro", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "Stage 'sft' has not finished" in capsys.readouterr().err
