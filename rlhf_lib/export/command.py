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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_lib import models
from rlhf_lib.artifacts import read_meta
from rlhf_lib.io import read_json
from rlhf_lib.pipeline import STAGES, RunPaths, default_runs_root, read_done
from rlhf_lib.prompting import PLAIN_TEMPLATE, format_prompt, uses_chat_template

REPO = Path(__file__).resolve().parents[2]
POLICIES = {"sft": ("sft", "policy"), "ppo": ("ppo", "ppo/policy"), "ppo_ptx": ("ppo", "ppo_ptx/policy")}
POLICY_TITLES = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
REWARD_DIR, REWARD_OWN_FORMAT_DIR, COMPARISONS_DIR = "reward_model", "reward_model_rlhf_format", "comparisons"
SCORE_OFFSET_KEY = "rlhf_score_offset"  # config.json: logits + offset = the study's score
REWARD_INPUT_KEY = "rlhf_reward_input"  # config.json: how to build the text the RM scores
# The extra coordinate's constant in a mid-block RM: C**2 must dwarf the squared norm of any hidden state
# (its share of the final norm's variance is the relative error, ~|h|^2 / C^2; SmolLM2-135M's mid-depth states
# reach |h| ~ 2.5e4) and C**2 / width must stay finite in float32 (and in bfloat16, which shares its range).
NORM_NEUTRALISING_CONSTANT = 1e10
HUB_SUFFIXES = {"sft": "-sft", "ppo": "-ppo", "ppo_ptx": "-ppo-ptx", REWARD_DIR: "-reward-model",
                REWARD_OWN_FORMAT_DIR: "-reward-model", COMPARISONS_DIR: "-comparisons"}


class ExportRefused(RuntimeError):
    """This artifact cannot be exported in the standard form with equal outputs (the message says why)."""


# --------------------------------------------------------------------------------------------
# What the study holds
# --------------------------------------------------------------------------------------------


@dataclass
class StudyContext:
    """Everything the cards need: preset, seed, stage records, data provenance, findings (or None)."""

    preset: str
    seed: int
    records: dict[str, dict]  # stage -> DONE.json (finished stages only)
    stage_dirs: dict[str, Path]
    data_info: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, Any] | None = None
    base_model: str = ""


def study_context(paths: RunPaths, results_dir: Path) -> StudyContext:
    """Read the finished stages of one preset (DONE.json), the data provenance and findings.json."""
    records, dirs = {}, {}
    for stage in STAGES:
        record = read_done(paths.stage(stage))
        if record is not None:
            records[stage], dirs[stage] = record, paths.stage(stage)
    # A torn file gives None with a warning (read_json): the cards then say "not available" instead of crashing.
    info = read_json(paths.stage("data") / "study" / "info.json")
    findings = read_json(Path(results_dir) / "findings.json")
    return StudyContext(paths.cfg.preset, paths.cfg.seed, records, dirs, info if isinstance(info, dict) else {},
                        findings if isinstance(findings, dict) else None, paths.cfg.model.name)


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


def merged_policy(policy_dir: Path) -> tuple[torch.nn.Module, Any]:
    """(causal LM with the policy's LoRA merged into its weights, tokenizer), float32 on CPU.

    A 4-bit study's adapter is merged into the full-precision base: merging into 4-bit weights would
    re-quantise them (lossy); the card says so.
    """
    from peft import PeftModel

    meta = read_meta(policy_dir)
    tokenizer = models.load_tokenizer(meta["base_model"])
    if meta.get("finetune", "lora") == "full":
        return models.load_causal_lm(str(policy_dir), device="cpu", dtype="float32"), tokenizer
    base = models.load_causal_lm(meta["base_model"], device="cpu", dtype="float32", quantize_4bit=False)
    return PeftModel.from_pretrained(base, str(policy_dir)).merge_and_unload(), tokenizer


def with_saved_settings(tokenizer, **settings: Any):
    """A copy of `tokenizer` with `settings` that survive save_pretrained (it writes only init kwargs)."""
    tokenizer = copy.deepcopy(tokenizer)
    for key, value in settings.items():
        setattr(tokenizer, key, value)
        tokenizer.init_kwargs[key] = value
    return tokenizer


def export_policy(policy_dir: Path, out_dir: Path) -> Path:
    """Save one policy as a standard checkpoint (safetensors + config + generation config + tokenizer)."""
    model, tokenizer = merged_policy(policy_dir)
    tokenizer = with_saved_settings(tokenizer, padding_side="left")  # batched generation needs left padding
    with models.atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


# --------------------------------------------------------------------------------------------
# The reward model
# --------------------------------------------------------------------------------------------


@dataclass
class RewardPlan:
    form: str  # "final_layer" or "block"
    block: int  # hidden_states index read by the head (1..num_layers)
    num_layers: int


def reward_export_plan(layer: int, pooling: str, num_layers: int, model_type: str) -> RewardPlan:
    """How an RM with this head can become a standard sequence classifier, or ExportRefused saying why."""
    if pooling != "last":
        raise ExportRefused(
            f"this RM's head reads the MEAN of the response tokens' hidden states (pooling={pooling!r}); a standard "
            "*ForSequenceClassification reads the last non-pad token only, and no weights make it average over a "
            "span (the response) that it cannot tell from the prompt, so its scores would not equal ours. "
            "What you can do: use the own-format copy with rlhf_lib.reward.RewardModel.load, or retrain the RM "
            "with `reward.pooling = \"last\"` (then it exports).")
    block = layer % (num_layers + 1)  # hidden_states has num_layers + 1 entries (0: the embeddings)
    if block == num_layers:
        return RewardPlan("final_layer", block, num_layers)
    if block < 1:
        raise ExportRefused("this RM reads the embeddings (hidden_states[0]); no standard classifier does.")
    if model_type != "llama":
        raise ExportRefused(
            f"this RM reads block {block} of {num_layers} (before the final norm); the exact construction for that "
            f"(see rlhf_lib.export) is written for Llama bodies, not {model_type!r}. Use the own-format copy.")
    return RewardPlan("block", block, num_layers)


def _classifier_config(lm_config, tokenizer, **changes: Any):
    config = copy.deepcopy(lm_config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _classifier(config):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    return model.eval()


@torch.no_grad()
def final_layer_classifier(lm: torch.nn.Module, tokenizer, head: models.ScalarHead) -> tuple[torch.nn.Module, float]:
    """(classifier, offset): the body as is, `score` = the head's weights; logits + offset = head output."""
    model = _classifier(_classifier_config(lm.config, tokenizer))
    getattr(model, model.base_model_prefix).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    model.score.weight.copy_(head.linear.weight.float())
    return model, float(head.linear.bias)


def _pad(tensor: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """Append zero rows (dim 0) and columns (dim 1, matrices only)."""
    if rows:
        tensor = torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])], 0)
    if cols:
        tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], cols)], 1)
    return tensor


def _widened_body_state(body_state: dict[str, torch.Tensor], block: int, extra: int, norm_scale: float) -> dict:
    """A Llama body's weights with `extra` more residual coordinates that nothing reads: embeddings and every
    writer get zero rows, every reader zero columns; norm weights rescaled for the wider mean (see caller)."""
    state, width = {}, body_state["embed_tokens.weight"].shape[1]
    for name, tensor in body_state.items():
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) >= block:
            continue  # blocks after the one the head reads are cut
        if name == "embed_tokens.weight":
            state[name] = _pad(tensor, cols=extra)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = _pad(tensor, rows=extra)
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            state[name] = _pad(tensor, cols=extra)
        elif name.endswith("layernorm.weight"):
            state[name] = torch.cat([tensor * norm_scale, tensor.new_ones(extra)])
        elif name == "norm.weight":
            continue  # the final norm is set by the caller
        elif tensor.dim() >= 1 and tensor.shape[0] == width and not name.endswith("bias"):
            raise ExportRefused(f"unexpected residual-stream weight {name}: cannot widen this body safely.")
        else:
            state[name] = tensor
    return state


@torch.no_grad()
def block_classifier(lm: torch.nn.Module, tokenizer, head: models.ScalarHead, block: int,
                     shift: float = 0.0) -> torch.nn.Module:
    """A Llama classifier whose logits equal head(hidden_states[block]) - shift at the last token, the head's
    bias included.

    The body is cut after `block` and widened to d + n_heads coordinates (Llama's config wants the width a
    multiple of the head count; attention keeps its own head_dim). Earlier norms see the new coordinates at
    0; their mean over `width` entries is d/width of ours, which eps * d/width and weights * sqrt(d/width)
    undo. Block `block`'s MLP bias writes C into the last coordinate after everything has read the stream;
    the final norm's variance is then (C^2 + |h|^2)/width ~ C^2/width, so weights 1/r0 (r0 = its rsqrt) give h
    back and weight 1/(C r0) gives 1 in the last coordinate; `score` = [head weights, 0..., head bias].
    """
    d, extra, C = lm.config.hidden_size, lm.config.num_attention_heads, NORM_NEUTRALISING_CONSTANT
    width = d + extra
    head_dim = getattr(lm.config, "head_dim", None) or d // lm.config.num_attention_heads
    changes: dict[str, Any] = {"hidden_size": width, "head_dim": head_dim, "num_hidden_layers": block, "mlp_bias": True,
                               "rms_norm_eps": lm.config.rms_norm_eps * d / width, "tie_word_embeddings": False}
    if getattr(lm.config, "layer_types", None):
        changes["layer_types"] = list(lm.config.layer_types)[:block]
    model = _classifier(_classifier_config(lm.config, tokenizer, **changes))
    body = getattr(model, model.base_model_prefix)
    state = _widened_body_state(getattr(lm, lm.base_model_prefix).state_dict(), block, extra, math.sqrt(d / width))
    for name, param in body.state_dict().items():
        if name not in state and name.endswith("bias"):  # mlp_bias adds biases: zero except the constant
            state[name] = torch.zeros_like(param)
    state[f"layers.{block - 1}.mlp.down_proj.bias"][-1] = C
    r0 = torch.rsqrt(torch.tensor(C, dtype=torch.float32) ** 2 / width + changes["rms_norm_eps"])
    state["norm.weight"] = torch.cat([torch.full((d,), 1.0) / r0, torch.zeros(extra - 1), (1.0 / (C * r0)).reshape(1)])
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportRefused(f"widening the body left weights unset {missing} or unused {unexpected}.")
    model.score.weight.copy_(torch.cat([head.linear.weight.float(), torch.zeros(1, extra - 1),
                                        (head.linear.bias.float() - shift).reshape(1, 1)], 1))
    return model


def reward_tokenizer(tokenizer, max_tokens: int):
    """The tokenizer as the exported RM needs it: right padding, cut from the left at the RM's length."""
    return with_saved_settings(tokenizer, padding_side="right", truncation_side="left", model_max_length=max_tokens)


def reward_text(tokenizer, prompt: str, response: str, ended: bool = True) -> str:
    """The exact text the study's RM scores: formatted prompt + answer + EOS only if the answer ended."""
    return format_prompt(tokenizer, prompt) + response.strip() + ((tokenizer.eos_token or "") if ended else "")


@torch.no_grad()
def exported_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                    ended: Sequence[bool] | None = None) -> torch.Tensor:
    """Scores of an exported RM (logits + the config's offset): how to call it, and what the tests compare."""
    ended = [True] * len(prompts) if ended is None else list(ended)
    texts = [reward_text(tokenizer, p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return logits.float() + float(getattr(model.config, SCORE_OFFSET_KEY, 0.0))


def _reward_input_spec(tokenizer, max_tokens: int) -> dict[str, Any]:
    return {"text": "prompt_text + response.strip() + (eos_token if the response ended with EOS else '')",
            "prompt_text": "tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False, "
                           "add_generation_prompt=True)" if uses_chat_template(tokenizer)
            else PLAIN_TEMPLATE.replace("{prompt}", "<prompt>"),
            "add_special_tokens": False, "padding_side": "right", "truncation_side": "left", "max_length": max_tokens}


def export_reward_model(reward_dir: Path, out_root: Path) -> tuple[Path, dict[str, Any]]:
    """Export the RM as a sequence classifier, or copy our format when that cannot give equal scores.

    Returns (folder written, summary); the summary's "refused" holds the reason when the copy was made.
    """
    from rlhf_lib.artifacts import RewardModel

    meta = read_meta(reward_dir)
    rm = RewardModel.load(reward_dir, device="cpu", quantize_4bit=False)
    lm = rm.model.merge_and_unload() if hasattr(rm.model, "merge_and_unload") else rm.model
    summary: dict[str, Any] = {"method": meta.get("method", "lora"), "layer": rm.layer, "pooling": rm.pooling,
                               "bias": rm.bias, "num_hidden_layers": lm.config.num_hidden_layers,
                               "quantize_4bit": bool(meta.get("quantize_4bit", False))}
    try:
        plan = reward_export_plan(rm.layer, rm.pooling, lm.config.num_hidden_layers, lm.config.model_type)
    except ExportRefused as err:
        out_dir = out_root / REWARD_OWN_FORMAT_DIR
        with models.atomic_directory(out_dir) as tmp:
            shutil.copytree(reward_dir, tmp, dirs_exist_ok=True)
        return out_dir, summary | {"refused": str(err)}
    tokenizer = reward_tokenizer(rm.tokenizer, rm.max_tokens)
    if plan.form == "final_layer":
        model, head_bias = final_layer_classifier(lm, tokenizer, rm.head)
        offset = head_bias - rm.bias
    else:
        model, offset = block_classifier(lm, tokenizer, rm.head, plan.block, shift=rm.bias), 0.0
    setattr(model.config, SCORE_OFFSET_KEY, offset)
    setattr(model.config, REWARD_INPUT_KEY, _reward_input_spec(tokenizer, rm.max_tokens))
    out_dir = out_root / REWARD_DIR
    with models.atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir, summary | {"form": plan.form, "block": plan.block, "score_offset": offset}


# --------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------


def comparison_splits(reward_stage: Path) -> dict[str, list[dict]]:
    """The reward stage's rankings by split: train, heldout_trainlabelers, heldout_heldoutlabelers."""
    from rlhf_lib.reward import COMPARISON_SETS

    splits = {}
    for file_name in COMPARISON_SETS:
        path = Path(reward_stage) / file_name
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            splits[file_name.removeprefix("comparisons_").removesuffix(".jsonl")] = [json.loads(x) for x in lines if x]
    return splits


def preference_pairs(rankings: Sequence[dict]) -> list[dict]:
    """TRL's preference rows: one per untied pair of each ranking (rank 0 is best; ties give no pair)."""
    from rlhf_lib.reward import ranked_pairs

    rows = []
    for row in rankings:
        ended = row.get("completion_ended") or [True] * len(row["completions"])
        for w, lo in ranked_pairs(row["ranks"]):
            rows.append({"prompt": row["prompt"], "chosen": row["completions"][w], "rejected": row["completions"][lo],
                         "prompt_id": row["prompt_id"], "labeler_id": row["labeler_id"],
                         "chosen_rank": int(row["ranks"][w]), "rejected_rank": int(row["ranks"][lo]),
                         "chosen_ended": bool(ended[w]), "rejected_ended": bool(ended[lo])})
    return rows


def _pair_features():
    from datasets import Features, Value

    return Features({"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"),
                     "prompt_id": Value("string"), "labeler_id": Value("string"), "chosen_rank": Value("int32"),
                     "rejected_rank": Value("int32"), "chosen_ended": Value("bool"), "rejected_ended": Value("bool")})


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Saving the dataset" bar per split (six of them say nothing useful)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def export_comparisons(reward_stage: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Write configs `pairs` and `rankings` (save_to_disk under arrow/, JSONL under pairs/ and rankings/).
    Returns {config: {split: rows}}."""
    from datasets import Dataset, DatasetDict

    from rlhf_lib.data.schema import COMPARISON_FEATURES

    splits = comparison_splits(reward_stage)
    if not splits:
        raise FileNotFoundError(f"{reward_stage} holds no comparisons_*.jsonl.")
    tables = {"pairs": {name: preference_pairs(rows) for name, rows in splits.items()},
              "rankings": {name: [{k: row.get(k) for k in COMPARISON_FEATURES} for row in rows]
                           for name, rows in splits.items()}}
    features = {"pairs": _pair_features(), "rankings": COMPARISON_FEATURES}
    with models.atomic_directory(out_dir) as tmp, _quiet_datasets():
        for config, by_split in tables.items():
            DatasetDict({split: Dataset.from_list(rows, features=features[config]) for split, rows in by_split.items()}
                        ).save_to_disk(str(tmp / "arrow" / config))
            for split, rows in by_split.items():
                _write_jsonl(tmp / config / f"{split}.jsonl", rows)
    return {config: {split: len(rows) for split, rows in by_split.items()} for config, by_split in tables.items()}


# --------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------

LIMITS = """## Limits

- **No human labels.** The rankings come from simulated labelers (`rlhf_lib.labelers`): rule-based scorers that
  judge an answer by its agreement with the human-written reference answer, relevance, format, instruction
  following, grounding, truthfulness and an offline toxicity score, each with its own weights and Thurstone
  noise calibrated to about 73% agreement between labelers. What the reward model learns is these rules, not
  human preferences.
- **Small models, small data.** The `{preset}` preset's base model is small{caps}; read the Findings
  section's intervals before any claim, and `results/SUMMARY.md` for what the study does and does not reproduce.
- Research artifact of a reproduction study (Ouyang et al. 2022, arXiv 2203.02155); not for deployment.
"""


def limits_section(ctx: StudyContext) -> str:
    caps = ctx.data_info.get("caps") or {}
    caps_text = (" and the preset caps the prompts at " + ", ".join(f"{n} {split}" for split, n in caps.items())
                 if caps else "")
    return LIMITS.format(preset=ctx.preset, caps=caps_text)


def bigbench_canary(data_info: dict[str, Any]) -> str | None:
    """BIG-bench's canary string, read from a task file when the task tree is on this machine; else None."""
    from rlhf_lib.data import bigbench

    provenance = data_info.get("provenance") or {}
    roots = [Path(provenance["checkout"])] if provenance.get("checkout") else []
    roots.append(bigbench.bigbench_cache_dir() / "benchmark_tasks")
    for root in roots:
        for task_file in sorted(root.glob("*/task.json"))[:20] if root.is_dir() else []:
            try:
                canary = json.loads(task_file.read_text()).get("canary")
            except (OSError, ValueError):
                continue
            if canary:
                return str(canary)
    return None


def data_section(ctx: StudyContext) -> str:
    provenance = ctx.data_info.get("provenance") or {}
    tasks = provenance.get("tasks") or sorted(provenance.get("tasks_sha256") or {})
    lines = ["## Data", ""]
    if provenance.get("hub"):
        lines.append(f"Hugging Face Hub datasets: {', '.join(map(str, provenance['hub']))}.")
    elif tasks:
        where = provenance.get("sdist") or f"a BIG-bench checkout ({provenance.get('checkout')})"
        lines.append(f"Human-written prompts and reference answers from BIG-bench ({where}), tasks: "
                     f"{', '.join(f'`{t}`' for t in tasks)}.")
    else:
        lines.append("Data provenance: not available (no data stage info.json was found).")
    if not provenance.get("hub"):
        canary = bigbench_canary(ctx.data_info)
        lines += ["", "**Canary warning.** The BIG-bench task files this was built from carry BIG-bench's canary string: "
                  "BIG-bench asks that its data never appear in training corpora. Prompts and reference-derived text "
                  "from it are in this artifact's training data (and in the comparisons dataset); keep them out of "
                  "anything used as pretraining or training data, and keep the canary with any copy."
                  + (f" The canary string: `{canary}`" if canary else
                     " (The task files were not on the exporting machine, so the string is not quoted here; it is "
                     "the `canary` field of every BIG-bench task.json.)")]
    return "\n".join(lines) + "\n"


def _format_finding(name: str, item: dict[str, Any]) -> str:
    unit = {"percent": "%"}.get(item.get("unit", ""), f" {item.get('unit', '')}".rstrip())
    interval = f" [{item['low']:.3g}, {item['high']:.3g}]" if item.get("low") is not None and item.get("high") is not None else ""
    n = f"n = {item['n']} {item.get('n_unit', '')}".strip() if item.get("n") is not None else "n not recorded"
    paper = f"; paper: {item['paper']}" if item.get("paper") is not None else ""
    verdict = f"; {item['verdict']}" if item.get("verdict") else ""
    return f"| {item.get('description', name)} | {item['value']:.3g}{unit}{interval} | {n}{paper}{verdict} |"


def findings_section(ctx: StudyContext) -> str:
    """The study's findings.json as a table (value, 95% interval, n, the paper's number); never invented."""
    lines = ["## Findings", ""]
    rows = [_format_finding(k, v) for k, v in (ctx.findings or {}).items()
            if isinstance(v, dict) and isinstance(v.get("value"), int | float)]
    if not rows:
        return "\n".join(lines + [f"Not available: no `results/{ctx.preset}/findings.json` from this study's analysis "
                                  "stage was found when exporting."]) + "\n"
    lines += [f"From `results/{ctx.preset}/findings.json` (95% intervals; see its `interval` field for each method):",
              "", "| finding | value [95% interval] | n; paper; verdict |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def provenance_section(ctx: StudyContext, stages: Sequence[str]) -> str:
    lines = ["## Provenance", "", f"Preset `{ctx.preset}`, seed {ctx.seed}, base model `{ctx.base_model}`"
             + (f" ({models.REGISTRY[ctx.base_model].license})" if ctx.base_model in models.REGISTRY else "") + ".", "",
             "| stage | fingerprint | commit | finished (UTC) |", "|---|---|---|---|"]
    for stage in stages:
        record = ctx.records.get(stage, {})
        lines.append(f"| {stage} | {record.get('fingerprint', 'n/a')} | {record.get('commit', 'n/a')} | "
                     f"{record.get('finished_utc', 'n/a')} |")
    return "\n".join(lines) + "\n"


def _knobs(ctx: StudyContext, stage: str, sections: Sequence[str]) -> str:
    config = ctx.records.get(stage, {}).get("config", {})
    picked = {s: config[s] for s in sections if s in config}
    return "```json\n" + json.dumps(picked, indent=1) + "\n```\n" if picked else "Not recorded.\n"


POLICY_METHODS = {
    "sft": "Supervised fine-tuning (step 1 of InstructGPT) on human-written demonstrations, loss on the response "
           "tokens only, LoRA adapters merged into the base for this export; the epoch with the best validation "
           "criterion.",
    "ppo": "PPO (step 3) from the SFT model's PPO initialisation against the study's reward model, with a "
           "per-token KL penalty to the SFT policy. LoRA merged.",
    "ppo_ptx": "PPO-ptx: PPO as above with pretraining gradients mixed in (the paper's fix for the alignment tax). "
               "LoRA merged.",
}
REWARD_METHODS = {
    "lora": "LoRA adapters of the SFT model and the head trained end to end",
    "cached_head": "the SFT model frozen; a linear head fitted on its pooled hidden states (depth, L2 strength and "
                   "epochs chosen on a validation split)",
    "cached_blocks": "the SFT model's top blocks (LoRA) and the head trained on cached states of the blocks below",
}


def ppo_selection(run_dir: Path) -> str:
    """Which iterate the PPO run published as policy/ and why, from its result.json; '' when it has none."""
    result_file = run_dir / "result.json"
    if not result_file.exists():
        return ""
    result = json.loads(result_file.read_text())
    chosen, done = result.get("chosen_iteration"), result.get("iterations_done")
    text = f" Trained {done} iterations; exported iterate: {'the last' if chosen is None else chosen}"
    if result.get("stop_reason"):
        text += f"; stopped early: {result['stop_reason']}"
    return text + " (the run's result.json says why)."



def front_matter(**fields: Any) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines += [f"{key}:", *[f"- {v}" for v in value]]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines + ["---", ""]) + "\n"


def policy_card(name: str, ctx: StudyContext, quantized_study: bool) -> str:
    stage, relative = POLICIES[name]
    selection = ppo_selection((ctx.stage_dirs[stage] / relative).parent) if stage in ctx.stage_dirs and stage == "ppo" else ""
    merge_note = ("\nThe study trained this adapter on a 4-bit base; it is merged here into the full-precision base, "
                  "so logits differ from the study's by the quantisation error.\n" if quantized_study else "")
    return (front_matter(library_name="transformers", pipeline_tag="text-generation",
                         tags=["rlhf", "instructgpt", "reproduction", name])
            + f"# InstructGPT reproduction, `{ctx.preset}`: {POLICY_TITLES[name]} policy\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")  # pads on the left, for generation\n```\n\n"
            "Prompts were formatted with the tokenizer's chat template when it has one, else `"
            + PLAIN_TEMPLATE.replace("\n", "\\n") + "`.\n\n"
            f"## Method\n\n{POLICY_METHODS[name]}{selection}{merge_note}\n\nKnobs of the stage that made it (from "
            "its DONE.json):\n\n"
            + _knobs(ctx, stage, ("model", stage)) + "\n" + data_section(ctx) + "\n" + findings_section(ctx) + "\n"
            + provenance_section(ctx, STAGES[: STAGES.index(stage) + 1]) + "\n" + limits_section(ctx))


def reward_card(ctx: StudyContext, summary: dict[str, Any]) -> str:
    layer_text = (f"hidden_states[{summary['layer']}] of a {summary['num_hidden_layers']}-block body, pooled "
                  f"`{summary['pooling']}`")
    if "refused" in summary:
        usage = ("**Not exported as `AutoModelForSequenceClassification`.** " + summary["refused"] + "\n\n"
                 "This folder is the study's own format (adapter + head + meta.json):\n\n```python\n"
                 "from rlhf_lib.reward import RewardModel\nrm = RewardModel.load(\"<this folder>\")\n"
                 "rm.score_texts([prompt], [answer], ended=[True])   # ended=False: the answer was cut, no EOS\n```\n")
    else:
        offset = summary["score_offset"]
        form = ("The body is the merged RM; `score` holds the head's weights. The class has no bias, so the head's "
                f"bias minus the normalisation bias ({offset:+.6g}) is in config.json as `{SCORE_OFFSET_KEY}`: "
                "logits + offset = the study's score; differences between answers (what a pairwise loss or a "
                "ranking uses) are equal without it."
                if summary["form"] == "final_layer" else
                f"The head reads block {summary['block']} before the final norm. The body is cut to "
                f"{summary['block']} blocks and widened by one head's worth of residual coordinates; the last is set "
                "to a large constant after every block has read the stream, which makes the final RMSNorm pass "
                "the block's state through unchanged (to float32 rounding) and output 1 there, where `score` keeps "
                "the bias. Logits equal the study's score, bias included. Run it in float32 (float16 overflows). "
                "Its body is not a language model any more.")
        usage = ("```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                 "model = AutoModelForSequenceClassification.from_pretrained(\"<this folder>\")\n"
                 "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")   # right padding, left truncation\n"
                 "text = prompt_text + answer.strip() + (tokenizer.eos_token if answer_ended else \"\")\n"
                 "batch = tokenizer([text], return_tensors=\"pt\", padding=True, truncation=True, "
                 "add_special_tokens=False)\n"
                 f"score = model(**batch).logits[:, 0] + model.config.{SCORE_OFFSET_KEY}\n```\n\n"
                 f"`prompt_text` and the rest of the input recipe are in config.json under `{REWARD_INPUT_KEY}` "
                 "(`rlhf_lib.export.exported_scores` does all of it). Pad on the right: the body counts positions "
                 "from each row's first token. An answer cut at the token budget gets no EOS, as in the study. "
                 f"Scores are normalised so human demonstrations average 0.\n\n{form}\n\n"
                 "In TRL: PPO's `get_reward` (left-padded query, right-padded answer, its own positions) reads these "
                 "scores as they are (tested). GRPOTrainer scores `prompt + completion` right-padded, as above, but "
                 "decodes completions without special tokens, so a finished answer reaches the RM without its EOS: "
                 "give it formatted prompts and a reward function that appends EOS to finished answers; the offset "
                 "cancels in GRPO's group-normalised advantages.\n")
    return (front_matter(library_name="transformers", pipeline_tag="text-classification",
                         tags=["rlhf", "instructgpt", "reward-model", "reproduction"])
            + f"# InstructGPT reproduction, `{ctx.preset}`: reward model\n\n" + usage
            + f"\n## Method\n\nStep 2 of InstructGPT: initialised from the SFT model, trained on K-wise rankings "
            f"(all C(K,2) pairs of a prompt in one batch element). Method `{summary['method']}`: "
            f"{REWARD_METHODS.get(summary['method'], 'see rlhf_lib.reward')}; the head reads {layer_text}.\n\n"
            + ("The study ran this RM on a 4-bit base; the export merges its adapter into the full-precision base, so "
               "its scores differ from the study's by the quantisation error.\n\n" if summary.get("quantize_4bit") else "")
            + "Knobs of the reward stage (from its DONE.json):\n\n" + _knobs(ctx, "reward", ("reward",)) + "\n"
            + data_section(ctx) + "\n"
            + findings_section(ctx) + "\n" + provenance_section(ctx, STAGES[:3]) + "\n" + limits_section(ctx))


def comparisons_card(ctx: StudyContext, counts: dict[str, dict[str, int]]) -> str:
    configs = []
    for config, splits in counts.items():
        configs += [f"- config_name: {config}", "  data_files:"]
        configs += [f"  - split: {split}\n    path: {config}/{split}.jsonl" for split in splits]
    table = "\n".join(f"| {config} | {split} | {n} |" for config, splits in counts.items() for split, n in splits.items())
    return ("---\nconfigs:\n" + "\n".join(configs) + "\ntags:\n- rlhf\n- preference\n- instructgpt\n---\n\n"
            f"# InstructGPT reproduction, `{ctx.preset}`: comparisons\n\n"
            "Two configs. `pairs`: TRL's preference format, `prompt` / `chosen` / `rejected` (the raw user prompt and "
            "answers, not templated), one row per untied pair of each ranking, with the ranks, the labeler and "
            "whether each answer ended with EOS (`*_ended`: False means it was cut at the token budget; the study's "
            "RM appends no EOS to those). `rankings`: the K-wise rankings, one row per (prompt, labeler): "
            "`completions`, `ranks` (0 is best, equal ranks are ties), `labeler_id`, sources, temperatures.\n\n"
            "Splits: `train` (training prompts ranked by training labelers), `heldout_trainlabelers` and "
            "`heldout_heldoutlabelers` (held-out prompts ranked by each population).\n\n"
            "```python\nfrom datasets import load_from_disk, load_dataset\n"
            "pairs = load_from_disk(\"<this folder>/arrow/pairs\")\n"
            "pairs = load_dataset(\"json\", data_files={\"train\": \"<this folder>/pairs/train.jsonl\"})\n```\n\n"
            "| config | split | rows |\n|---|---|---|\n" + table + "\n\n" + data_section(ctx) + "\n"
            + findings_section(ctx) + "\n" + provenance_section(ctx, STAGES[:3]) + "\n" + limits_section(ctx))


# --------------------------------------------------------------------------------------------
# The Hub (only with --push-to-hub)
# --------------------------------------------------------------------------------------------


def hub_repo_ids(prefix: str, exported: Sequence[str]) -> dict[str, str]:
    """Repository id of each exported folder: <prefix>-sft, -ppo, -ppo-ptx, -reward-model, -comparisons."""
    return {name: prefix + HUB_SUFFIXES[name] for name in exported}


def push_to_hub(folder: Path, repo_id: str, repo_type: str = "model", private: bool = True) -> None:
    """Create the repository (private unless told otherwise) and upload the folder. Network: only here."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                      ignore_patterns=["arrow/**"] if repo_type == "dataset" else None)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _write_card(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text, encoding="utf-8")


def export_study(paths: RunPaths, out: Path, results_dir: Path, progress=print) -> dict[str, Any]:
    """Export every finished artifact of one preset's study into `out`; returns what export.json records."""
    ctx = study_context(paths, results_dir)
    paths.require("sft")  # nothing to export without it: a clear error saying what to run
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"preset": ctx.preset, "seed": ctx.seed, "exported": {}, "skipped": {}}
    for name, (stage, relative) in POLICIES.items():
        policy_dir = paths.stage(stage) / relative
        if stage not in ctx.records or not (policy_dir / "meta.json").exists():
            report["skipped"][name] = f"no finished {stage} stage with {relative} ({paths.stage(stage)})"
            continue
        progress(f"export: {name} policy <- {policy_dir}")
        folder = export_policy(policy_dir, out / name)
        _write_card(folder, policy_card(name, ctx, bool(read_meta(policy_dir).get("quantize_4bit"))))
        report["exported"][name] = str(folder)
    if "reward" in ctx.records:
        progress(f"export: reward model <- {paths.stage('reward') / 'model'}")
        folder, summary = export_reward_model(paths.stage("reward") / "model", out)
        other = REWARD_OWN_FORMAT_DIR if folder.name == REWARD_DIR else REWARD_DIR
        shutil.rmtree(out / other, ignore_errors=True)  # an earlier export's other form would contradict this one
        _write_card(folder, reward_card(ctx, summary))
        report["exported"][folder.name] = str(folder)
        report["reward_model"] = summary
        progress("export: comparisons")
        counts = export_comparisons(paths.stage("reward"), out / COMPARISONS_DIR)
        _write_card(out / COMPARISONS_DIR, comparisons_card(ctx, counts))
        report["exported"][COMPARISONS_DIR] = str(out / COMPARISONS_DIR)
        report["comparisons"] = counts
    else:
        report["skipped"]["reward_model"] = report["skipped"]["comparisons"] = f"no finished reward stage ({paths.stage('reward')})"
    (out / "export.json").write_text(json.dumps(report, indent=1))
    return report


def push_exports(report: dict[str, Any], prefix: str, private: bool = True, progress=print) -> dict[str, str]:
    """Push every exported folder to <prefix>-<artifact> (the comparisons as a dataset repository)."""
    repos = hub_repo_ids(prefix, list(report["exported"]))
    for name, repo_id in repos.items():
        progress(f"push: {report['exported'][name]} -> {repo_id}")
        push_to_hub(Path(report["exported"][name]), repo_id, "dataset" if name == COMPARISONS_DIR else "model", private)
    return repos


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_lib.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="preset whose finished study is exported (default: tiny)")
    parser.add_argument("--out", required=True, help="folder to write the exports into")
    parser.add_argument("--runs-dir", default="", help="stage artifacts folder, as run_all.py's (default: runs/); "
                        "its <size>/ subfolder is read")
    parser.add_argument("--results-dir", default="", help="where findings.json is (default: results/<size>/)")
    parser.add_argument("--overrides-json", default="{}", help="the dotted overrides the study ran with, as JSON "
                        "(they change the stage fingerprints), e.g. '{\"ppo.iterations\": 10}'")
    parser.add_argument("--push-to-hub", default="", metavar="REPO_PREFIX",
                        help="also upload each folder to <REPO_PREFIX>-sft, -ppo, ... (off by default)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: public repositories (default private)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from rlhf_lib.config import load_preset

    args = parse_args(argv)
    cfg = load_preset(args.size, json.loads(args.overrides_json or "{}"))
    runs_root = Path(args.runs_dir).expanduser().resolve() if args.runs_dir else default_runs_root()
    paths = RunPaths.for_config(cfg, runs_root / args.size)
    results_dir = Path(args.results_dir) if args.results_dir else REPO / "results" / args.size
    try:
        report = export_study(paths, Path(args.out).expanduser().resolve(), results_dir)
    except FileNotFoundError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    for name, reason in report["skipped"].items():
        print(f"export: skipped {name}: {reason}")
    if "refused" in report.get("reward_model", {}):
        print(f"export: reward model copied in the study's own format: {report['reward_model']['refused']}")
    if args.push_to_hub:
        push_exports(report, args.push_to_hub, private=not args.public)
    print(f"export: wrote {', '.join(report['exported'])} to {args.out}")
    return 0
