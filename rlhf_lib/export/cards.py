"""Model and dataset cards: data, method, preset, findings with their intervals, provenance and limits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_lib import models
from rlhf_lib.export.common import POLICIES, POLICY_TITLES, REWARD_INPUT_KEY, SCORE_OFFSET_KEY, StudyContext
from rlhf_lib.pipeline import STAGES
from rlhf_lib.prompting import PLAIN_TEMPLATE

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


