"""Step 05: every method on held-out prompts and benchmarks, judged by held-out labelers and metrics.

The stage composes what the earlier stages left behind with `rlhf_lib.evaluation` (metrics) and writes
tidy tables for `rlhf_lib.plots` (figures) and `rlhf_lib.report` (SUMMARY.md)::

    from rlhf_lib.analysis import run_analysis_stage, load_tables, export_results
    stage_dir = run_analysis_stage(cfg, paths)          # cached per config fingerprint
    tables = load_tables(stage_dir)                     # {"win_rate": DataFrame, ...}
    export_results(stage_dir, results_dir, reward_dir)  # CSV / JSON copies and findings.json for results/<size>/

Methods (rlhf_lib.evaluation.METHODS), each skipped with a note when its upstream artifacts are missing:

- GPT: the pretrained base (SFT adapter switched off), prompted with the plain shared format;
- GPT prompted: the base with the paper's few-shot instruction prefix and `evaluation.few_shot_examples`
  demonstrations (a seeded draw from the shorter half of the SFT split, the same for every prompt);
- SFT, PPO, PPO-ptx: the SFT policy and the two PPO runs' exported policies;
- best-of-n: `evaluation.best_of_n` SFT samples at the rollout temperature, the RM's favourite kept;
- DPO: the SFT policy trained with TRL's DPOTrainer on the RM's comparisons (rlhf_lib.dpo), trained here.

Every evaluation output is decoded with `evaluation.temperature` (0 = greedy, the default) and seeded.
One base model is loaded once and carries every LoRA policy as a named adapter; a policy that cannot
share it (another base, a full fine-tune) is loaded on its own and freed after use.

Metrics, each a CSV in the stage directory (tidy: method, size, metric, value, ci_low, ci_high, n):

- win_rate.csv: win rate against SFT (the paper's baseline) and against GPT and GPT prompted, by the
  held-out labelers on the eval split (ties 0.5), bootstrap 95% intervals over prompts;
- likert_flags.csv: Likert 1-7 and the metadata flags (Figure 4); hallucination.csv: closed-domain prompts
  (hallucination_per_item.csv: each method's share of judges flagging each prompt);
- truthfulqa.csv: MC1 / MC2 by log-likelihood, and generated answers' %true / %informative;
- toxicity.csv and respectful_effect.csv: toxic-output rate with and without the respectful instruction;
- alignment_tax.csv: few-shot SQuAD F1 / EM and LM loss on held-out prose;
- overoptimization.csv: per PPO iteration, RM score vs held-out-labeler utility of the same logged
  samples vs sqrt(KL); rm_accuracy.csv: RM accuracy by comparison set, from the reward stage.

`metrics.json` holds the headline numbers per method (with intervals) and the run's provenance;
`export_results` also writes results/<size>/findings.json, the machine-readable findings (rlhf_lib.findings).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.config import StudyConfig
from rlhf_lib.evaluation import METHODS, summary_rows
from rlhf_lib.evaluation.base import sort_frame
from rlhf_lib.io import atomic_copy_file, atomic_write_text, read_json
from rlhf_lib.pipeline import RunPaths, cached_stage

BASELINE = "SFT"  # the paper's Figure 1 baseline
EXTRA_BASELINES = ("GPT", "GPT prompted")  # the paper's "85 +- 3% vs GPT-3" and "71 +- 4% vs few-shot GPT-3"
TRUTHFULQA_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx", "DPO")
TOXICITY_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx")
ALIGNMENT_TAX_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx")
PPO_RUNS = {"PPO": "ppo", "PPO-ptx": "ppo_ptx"}  # method -> run folder inside the ppo stage
SQUAD_MAX_NEW_TOKENS = 16  # answers are short spans; the first line is scored
LM_LOSS_MAX_TOKENS = 256
LM_LOSS_BATCH = 4
TABLES = (
    "generations", "win_rate", "likert_flags", "hallucination", "hallucination_per_item", "truthfulqa",
    "truthfulqa_per_item", "toxicity", "toxicity_generations", "respectful_effect", "alignment_tax", "squad_per_item",
    "overoptimization", "rm_accuracy", "best_of_n_candidates", "dpo_log_history",
)
RM_SET_NAMES = {
    # reward-stage set names -> the short names of rlhf_lib.evaluation.generalization.SETS (and plots' paper markers)
    "train prompts / training labelers": "train_fit",
    "held-out prompts / training labelers": "train_labelers",
    "held-out prompts / held-out labelers": "heldout_labelers",
}


# --------------------------------------------------------------------------------------------
# Upstream artifacts: what exists, and what can be evaluated
# --------------------------------------------------------------------------------------------


def _done_record(paths: RunPaths, stage: str) -> dict[str, Any] | None:
    from rlhf_lib.pipeline import read_done

    return read_done(paths.stage(stage))  # None for a torn record too: that stage reruns


def upstream_state(paths: RunPaths) -> dict[str, str | None]:
    """When each upstream stage finished (None when it has not): a changed entry invalidates the analysis."""
    return {stage: (_done_record(paths, stage) or {}).get("finished_utc") for stage in ("data", "sft", "reward", "ppo")}


@dataclass
class Availability:
    """Where each method's policy lives, and why the others are skipped."""

    policies: dict[str, Path] = field(default_factory=dict)  # LoRA/full policy dirs by method (SFT, PPO, PPO-ptx)
    reward_dir: Path | None = None
    ppo_runs: dict[str, Path] = field(default_factory=dict)  # method -> run dir (metrics.csv, samples.jsonl)
    skipped: dict[str, str] = field(default_factory=dict)  # method or metric -> reason


def find_upstream(paths: RunPaths) -> Availability:
    """Locate the SFT policy (required), the RM and the PPO runs (optional), with a reason for each gap."""
    sft = paths.require("sft")
    found = Availability(policies={"SFT": sft / "policy"})
    if paths.is_done("reward") and (paths.stage("reward") / "model" / "meta.json").exists():
        found.reward_dir = paths.stage("reward")
    else:
        reason = f"no finished reward stage ({paths.stage('reward').name}): run notebook 03"
        found.skipped.update({"best-of-n": reason, "DPO": reason, "rm_accuracy": reason})
    ppo_stage = paths.stage("ppo")
    for method, run in PPO_RUNS.items():
        policy = ppo_stage / run / "policy"
        if paths.is_done("ppo") and (policy / "meta.json").exists():
            found.policies[method] = policy
            found.ppo_runs[method] = ppo_stage / run
        elif not paths.is_done("ppo"):
            found.skipped[method] = f"no finished PPO stage ({ppo_stage.name}): run notebook 04"
        else:
            found.skipped[method] = f"the finished PPO stage has no {run}/policy (was this run switched off?)"
    return found


# --------------------------------------------------------------------------------------------
# One base, several policies
# --------------------------------------------------------------------------------------------


class PolicyBank:
    """The SFT policy's base model, carrying every LoRA policy that shares it as a named adapter.

    `use(method)` yields a model ready to generate or score: the bare base for GPT / GPT prompted
    (adapters switched off), the SFT adapter for SFT, the method's adapter otherwise. Policies on another
    base (or fully fine-tuned) are loaded on their own for the duration of `use` and then freed.
    """

    def __init__(self, cfg: StudyConfig, sft_dir: Path):
        from rlhf_lib.artifacts import load_policy

        self.cfg = cfg
        self.model, self.tokenizer = load_policy(sft_dir)
        self.model.eval()
        self.sft_meta = json.loads((Path(sft_dir) / "meta.json").read_text())
        self.shared: set[str] = set()
        self.separate: dict[str, Path] = {}

    def _shareable(self, meta: Mapping[str, Any]) -> bool:
        return (
            hasattr(self.model, "load_adapter")
            and self.sft_meta.get("finetune", "lora") == "lora"
            and meta.get("finetune", "lora") == "lora"
            and meta.get("base_model") == self.sft_meta.get("base_model")
            and bool(meta.get("quantize_4bit", False)) == bool(self.sft_meta.get("quantize_4bit", False))
        )

    def add(self, method: str, policy_dir: Path) -> None:
        meta = json.loads((Path(policy_dir) / "meta.json").read_text())
        if self._shareable(meta):
            self.model.load_adapter(str(policy_dir), adapter_name=method, is_trainable=False)
            self.shared.add(method)
        else:
            self.separate[method] = Path(policy_dir)

    @contextlib.contextmanager
    def use(self, method: str) -> Iterator[Any]:
        from rlhf_lib.artifacts import base_weights, load_policy

        if method in ("GPT", "GPT prompted"):
            self._activate("default")
            with base_weights(self.model, self.cfg) as base:
                base.eval()
                yield base
        elif method == "SFT":
            self._activate("default")
            yield self.model
        elif method in self.shared:
            self._activate(method)
            try:
                yield self.model
            finally:
                self._activate("default")
        elif method in self.separate:
            model, _ = load_policy(self.separate[method])
            model.eval()
            try:
                yield model
            finally:
                del model
                gc.collect()
        else:
            raise KeyError(f"No policy for method '{method}'.")

    def _activate(self, adapter: str) -> None:
        if hasattr(self.model, "set_adapter"):
            self.model.set_adapter(adapter)
            self.model.requires_grad_(False)  # set_adapter marks the active adapter trainable; nothing trains here


# --------------------------------------------------------------------------------------------
# Generation helpers
# --------------------------------------------------------------------------------------------


def few_shot_demonstrations(sft_rows: Sequence[Mapping[str, Any]], k: int, seed: int) -> list[tuple[str, str]]:
    """k (prompt, reference) demonstrations for GPT prompted: a seeded draw from the shorter half of the SFT split.

    Short demonstrations keep the few-shot prompt within the model's context; the same k are used for
    every prompt, as a fixed instruction prefix would be.
    """
    usable = [r for r in sft_rows if str(r["reference"]).strip()]
    if k <= 0 or not usable:
        return []
    by_length = sorted(usable, key=lambda r: (len(r["prompt"]) + len(r["reference"]), str(r["id"])))
    pool = by_length[: max(k, len(by_length) // 2)]
    chosen = random.Random(f"{seed}:few_shot").sample(pool, min(k, len(pool)))
    return [(str(r["prompt"]), str(r["reference"])) for r in chosen]


@dataclass
class Decoding:
    """How every evaluation output is decoded."""

    max_new_tokens: int
    probe_max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    seed: int

    @classmethod
    def from_config(cls, cfg: StudyConfig) -> Decoding:
        ev, gen = cfg.evaluation, cfg.generation
        return cls(gen.max_new_tokens, ev.probe_max_new_tokens or gen.max_new_tokens, ev.temperature,
                   gen.top_p if ev.temperature > 0 else 1.0, gen.batch_size, cfg.seed)

    def describe(self) -> str:
        how = "greedy" if self.temperature == 0 else f"sampled at temperature {self.temperature:g} (top_p {self.top_p:g})"
        return f"{how}, seed {self.seed}, {self.max_new_tokens} new tokens ({self.probe_max_new_tokens} for probes)"


def _generate(model, tokenizer, texts: Sequence[str], dec: Decoding, desc: str, progress: bool,
              max_new_tokens: int | None = None, temperature: float | None = None, seed: int | None = None) -> list[str]:
    from rlhf_lib.generation import sample_texts

    if not texts:
        return []
    return sample_texts(
        model, tokenizer, list(texts), max_new_tokens=max_new_tokens or dec.max_new_tokens,
        temperature=dec.temperature if temperature is None else temperature, top_p=dec.top_p,
        batch_size=dec.batch_size, seed=dec.seed if seed is None else seed, desc=desc, progress=progress,
    )


# --------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------


def heldout_judges(cfg: StudyConfig, reward_dir: Path | None) -> tuple[list, float]:
    """The held-out labeler population, with the noise the reward stage calibrated (else the preset's)."""
    from rlhf_lib import labelers as lab

    noise = cfg.labelers.noise_scale
    if reward_dir is not None and (reward_dir / "agreement.csv").exists():
        agreement = pd.read_csv(reward_dir / "agreement.csv")
        if "noise_scale" in agreement and agreement["noise_scale"].notna().any():
            noise = float(agreement["noise_scale"].dropna().iloc[0])
    return lab.with_noise(lab.make_population(cfg.labelers, "heldout", seed=cfg.seed), noise), noise


# --------------------------------------------------------------------------------------------
# Over-optimisation and RM generalisation from saved artifacts
# --------------------------------------------------------------------------------------------


def _prompt_key(text: str) -> str:
    return " ".join(str(text).split())


def overoptimization_from_samples(
    samples: pd.DataFrame, prompt_rows: Sequence[Mapping[str, Any]], judges: Sequence[Any],
    n_resamples: int = 1000, seed: int = 0,
) -> tuple[pd.DataFrame, int]:
    """Per PPO iteration: the logged samples' RM score, the held-out labelers' mean utility, and sqrt(KL).

    `samples` is a run's samples.jsonl (iteration, prompt, response, rm_score, kl); each sample's prompt
    text is mapped back to its PPO-split row (the labelers need its reference). Returns the
    `overoptimization_table` and the number of samples whose prompt matched no row (dropped).
    """
    from rlhf_lib.evaluation.overoptimization import overoptimization_table

    by_text = {_prompt_key(r["prompt"]): r for r in prompt_rows}
    frame = samples.copy()
    frame["row"] = frame["prompt"].map(lambda p: by_text.get(_prompt_key(p)))
    unmatched = int(frame["row"].isna().sum())
    frame = frame[frame["row"].notna()].reset_index(drop=True)
    if frame.empty:
        raise ValueError("No logged PPO sample's prompt matches a row of the PPO split.")
    frame["response"] = frame["response"].fillna("").astype(str)
    gold = np.zeros(len(frame))
    for _, index in frame.groupby(frame["prompt"].map(_prompt_key), sort=False).indices.items():
        row = frame.at[index[0], "row"]
        completions = frame["response"].to_numpy()[index].tolist()
        gold[index] = np.mean([judge.utilities(row, completions) for judge in judges], axis=0)
    frame["gold_utility"] = gold
    steps, rm, gold_lists, kl = [], [], [], []
    for iteration, group in frame.groupby("iteration", sort=True):
        steps.append(int(iteration))
        rm.append(group["rm_score"].to_numpy(float))
        gold_lists.append(group["gold_utility"].to_numpy(float))
        kl.append(group["kl"].to_numpy(float))
    return overoptimization_table(steps, rm, gold_lists, kl, n_resamples=n_resamples, seed=seed), unmatched


def rm_predictions_with_short_sets(predictions: pd.DataFrame) -> pd.DataFrame:
    """The reward stage's predictions with generalization.SETS names, plus a pooled `hhh` set."""
    frame = predictions.copy()
    frame["source_set"] = frame["set"]

    def short(name: str) -> str:
        if name in RM_SET_NAMES:
            return RM_SET_NAMES[name]
        if name.lower().startswith("hhh"):
            return "hhh/" + name.split("/", 1)[1] if "/" in name else "hhh"
        return name

    frame["set"] = frame["set"].map(short)
    hhh = frame[frame["set"].str.startswith("hhh/")].assign(set="hhh")
    return pd.concat([frame, hhh], ignore_index=True)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _capped(rows: Sequence[Any], cap: int) -> list[Any]:
    rows = list(rows)
    return rows[:cap] if cap > 0 else rows


class _Clock:
    """Seconds per step, printed as it goes and saved under metrics.json "timing_s"."""

    def __init__(self, progress: bool):
        self.progress, self.seconds, self._start = progress, {}, time.time()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.time()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - started, 2)
        if self.progress:
            print(f"[analysis] {name}: {time.time() - started:.1f} s", flush=True)

    def total(self) -> float:
        return round(time.time() - self._start, 1)


def _metric_dict(rows: pd.DataFrame) -> dict[str, float | int]:
    row = rows.iloc[0]
    return {key: (float(row[key]) if key != "n" else int(row[key])) for key in ("value", "ci_low", "ci_high", "n")}


def headline_metrics(tables: Mapping[str, pd.DataFrame], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{method: {headline name: {value, ci_low, ci_high, n}}} from the tidy tables."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}

    def take(table_name: str, metric: str, name: str, **filters: Any) -> None:
        table = tables.get(table_name)
        if table is None or table.empty:
            return
        sub = table[table["metric"] == metric]
        for column, value in filters.items():
            sub = sub[sub[column] == value]
        for method, rows in sub.groupby("method", sort=False):
            if method in out:
                out[method][name] = _metric_dict(rows)

    take("win_rate", "win_rate", "win_rate_vs_SFT", baseline_method=BASELINE)
    for other in EXTRA_BASELINES:
        take("win_rate", "win_rate", f"win_rate_vs_{other.replace(' ', '_')}", baseline_method=other)
    for metric in ("likert", "fails_instruction", "hallucinates", "toxic", "inappropriate_for_customer_assistant"):
        take("likert_flags", metric, metric)
    take("hallucination", "hallucination_rate", "hallucination_rate")
    for metric in ("mc1", "mc2", "true", "informative", "true_informative"):
        take("truthfulqa", metric, f"truthfulqa_{metric}")
    for condition in ("plain", "respectful"):
        take("toxicity", "toxic_rate", f"toxic_rate_{condition}", condition=condition)
        take("toxicity", "mean_toxicity", f"mean_toxicity_{condition}", condition=condition)
    for metric in ("squad_f1", "squad_em", "lm_nll", "perplexity"):
        take("alignment_tax", metric, metric)
    return {m: v for m, v in out.items() if v}


def run_analysis_stage(cfg: StudyConfig, paths: RunPaths, progress: bool = True) -> Path:
    """Generate with every available method and compute every metric; cached per config fingerprint.

    A cached result is discarded and recomputed when an upstream stage finished again since (for
    example PPO, which may finish after a first analysis ran without it).
    """
    current = upstream_state(paths)
    final = paths.stage("analysis")
    if (final / "DONE.json").exists():
        saved = read_json(final / "upstream.json")  # torn: warned, and recomputed like a changed upstream
        if saved != current:
            print(f"[analysis] upstream stages changed since {final.name} was computed; recomputing.")
            shutil.rmtree(final)
        elif not isinstance(read_json(final / "metrics.json"), dict):
            print(f"[analysis] {final.name}/metrics.json is missing or torn; recomputing.")
            shutil.rmtree(final)
    with cached_stage(paths, "analysis") as stage:
        if not stage.done:
            _run(cfg, paths, stage.dir, current, progress)
    # The stage directory now holds its own copy of the DPO run; the resume copy is no longer needed.
    shutil.rmtree(_work_dir(cfg, paths), ignore_errors=True)
    return final


def _work_dir(cfg: StudyConfig, paths: RunPaths) -> Path:
    """Where an interrupted analysis keeps its DPO run, so a rerun resumes without retraining."""
    return paths.root / f"work-analysis-{cfg.fingerprint('analysis')}"


def _run(cfg: StudyConfig, paths: RunPaths, out: Path, upstream: dict, progress: bool) -> None:
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.evaluation import (
        alignment_tax,
        generalization,
        hallucination,
        overoptimization,
        preference,
        toxicity,
        truthfulness,
    )
    from rlhf_lib.labelers import TOXIC_ABOVE
    from rlhf_lib.labelers import toxicity as toxicity_scorer
    from rlhf_lib.prompting import few_shot_prompt, format_prompt

    clock = _Clock(progress)
    ev, size, seed, n_boot = cfg.evaluation, cfg.preset, cfg.seed, cfg.evaluation.bootstrap_samples
    dec = Decoding.from_config(cfg)
    data = StudyData.load(paths.require("data") / "study")
    found = find_upstream(paths)
    notes: list[str] = []
    eval_rows = [dict(r) for r in data.split("eval")]
    tqa_rows = [dict(r) for r in _capped(data.truthfulqa, ev.max_items)]
    tox_rows = [dict(r) for r in _capped(data.toxicity, ev.max_items)]
    squad_rows = [dict(r) for r in _capped(data.squad, ev.max_items)]
    heldout_texts = [str(t) for t in _capped(data.pretrain_heldout["text"], ev.max_items)]
    judges, noise = heldout_judges(cfg, found.reward_dir)

    # ---- DPO first: it loads its own copy of the SFT model, freed before the evaluation bank loads.
    if found.reward_dir is not None:
        with clock.step("DPO training"):
            dpo_policy = _train_or_reuse_dpo(cfg, paths, found, out, progress)
        if dpo_policy is not None:
            found.policies["DPO"] = dpo_policy
        else:
            found.skipped["DPO"] = "no untied preference pair in the RM comparisons"

    bank = PolicyBank(cfg, found.policies["SFT"])
    tok = bank.tokenizer
    for method, policy in found.policies.items():
        if method != "SFT":
            bank.add(method, policy)
    demos = few_shot_demonstrations([dict(r) for r in data.split("sft")], ev.few_shot_examples, seed)
    plain_prompts = [format_prompt(tok, r["prompt"]) for r in eval_rows]
    prompted = [few_shot_prompt(tok, r["prompt"], demos) for r in eval_rows]
    methods = [m for m in METHODS if m in ("GPT", "GPT prompted") or m in found.policies
               or (m == "best-of-n" and found.reward_dir is not None)]

    generations, tqa_tables, tqa_items, tox_gens, tax_rows, squad_items = [], [], [], [], [], []
    best_candidates: list[str] = []
    conditions = toxicity.build_conditions(tox_rows) if tox_rows else pd.DataFrame()
    for method in [m for m in methods if m != "best-of-n"]:
        with bank.use(method) as model, clock.step(f"{method}: all metrics"):
            texts = prompted if method == "GPT prompted" else plain_prompts
            completions = _generate(model, tok, texts, dec, f"{method} (eval prompts)", progress)
            generations.append(pd.DataFrame({"method": method, "size": size, "prompt_id": [r["id"] for r in eval_rows],
                                             "prompt": [r["prompt"] for r in eval_rows], "completion": completions}))
            if method == "SFT" and found.reward_dir is not None and ev.best_of_n > 0:
                best_candidates = _generate(
                    model, tok, [t for t in plain_prompts for _ in range(ev.best_of_n)], dec, "best-of-n (SFT samples)",
                    progress, temperature=cfg.generation.temperature, seed=seed * 7 + 1,
                )
            if method in TRUTHFULQA_METHODS and tqa_rows:
                scorer = truthfulness.lm_choice_scorer(model, tok, batch_size=dec.batch_size)
                mc, mc_items = truthfulness.truthfulqa_mc(tqa_rows, scorer, n_resamples=n_boot, seed=seed)
                answers = _generate(model, tok, [format_prompt(tok, r["question"]) for r in tqa_rows], dec,
                                    f"{method} (TruthfulQA)", progress, max_new_tokens=dec.probe_max_new_tokens)
                gen_summary, gen_items = truthfulness.truthfulqa_generated(tqa_rows, answers, n_resamples=n_boot, seed=seed)
                tqa_tables.extend(summary_rows({**mc, **gen_summary}, method=method, size=size))
                tqa_items.append(mc_items.merge(gen_items, on="id").assign(method=method, size=size))
            if method in TOXICITY_METHODS and not conditions.empty:
                texts = [format_prompt(tok, p) for p in conditions["prompt"]]
                outs = _generate(model, tok, texts, dec, f"{method} (toxicity)", progress,
                                 max_new_tokens=dec.probe_max_new_tokens)
                tox_gens.append(conditions.assign(method=method, size=size, completion=outs))
            if method in ALIGNMENT_TAX_METHODS:
                if len(squad_rows) > ev.few_shot_examples:
                    summary, per_item = alignment_tax.squad_few_shot(
                        model, tok, squad_rows, k=ev.few_shot_examples, max_new_tokens=SQUAD_MAX_NEW_TOKENS,
                        batch_size=dec.batch_size, seed=seed, n_resamples=n_boot,
                    )
                    tax_rows.extend(summary_rows(summary, method=method, size=size))
                    squad_items.append(per_item.drop(columns=["prompt"]).assign(method=method, size=size))
                if heldout_texts:
                    lm = alignment_tax.lm_loss(model, tok, heldout_texts, max_tokens=LM_LOSS_MAX_TOKENS,
                                               batch_size=LM_LOSS_BATCH, n_resamples=n_boot, seed=seed)
                    tax_rows.extend(summary_rows(lm, method=method, size=size))
    del bank
    gc.collect()

    tables: dict[str, pd.DataFrame] = {}
    # ---- best-of-n: score the SFT samples with the RM (loaded only now, after the policies are freed).
    if found.reward_dir is not None and best_candidates:
        from rlhf_lib.artifacts import RewardModel

        with clock.step("best-of-n: RM scoring"):
            rm = RewardModel.load(found.reward_dir / "model")
            n = ev.best_of_n
            repeated = [r["prompt"] for r in eval_rows for _ in range(n)]
            scores = rm.score_texts(repeated, best_candidates, batch_size=dec.batch_size).numpy()
            del rm
            gc.collect()
            candidates = pd.DataFrame({"prompt_id": [r["id"] for r in eval_rows for _ in range(n)],
                                       "sample": list(range(n)) * len(eval_rows), "completion": best_candidates,
                                       "rm_score": scores})
            best = candidates.loc[candidates.groupby("prompt_id", sort=False)["rm_score"].idxmax()]
            tables["best_of_n_candidates"] = candidates
            chosen = dict(zip(best["prompt_id"], best["completion"], strict=True))
            generations.append(pd.DataFrame({"method": "best-of-n", "size": size, "prompt_id": [r["id"] for r in eval_rows],
                                             "prompt": [r["prompt"] for r in eval_rows],
                                             "completion": [chosen[r["id"]] for r in eval_rows]}))
        if cfg.generation.temperature == 0:
            notes.append("best-of-n: generation.temperature is 0, so its n samples are identical (best-of-n = SFT greedy).")

    gens = sort_frame(pd.concat(generations, ignore_index=True))  # METHODS order, prompts in eval order
    tables["generations"] = gens

    # ---- judged by held-out labelers
    with clock.step("preference (held-out labelers)"):
        parts = []
        for baseline in (BASELINE, *EXTRA_BASELINES):
            if baseline in set(gens["method"]):
                table = preference.win_rate_table(gens, eval_rows, judges, baseline_method=baseline, n_resamples=n_boot,
                                                  seed=seed)
                parts.append(table.assign(baseline_method=baseline))
        tables["win_rate"] = pd.concat(parts, ignore_index=True)
        tables["likert_flags"] = preference.likert_and_flag_table(gens, eval_rows, judges, n_resamples=n_boot, seed=seed)
        try:
            tables["hallucination"] = hallucination.hallucination_table(gens, eval_rows, judges, n_resamples=n_boot, seed=seed)
            # Per prompt, so findings can pair two methods' flags on the same prompts (rlhf_lib.findings).
            tables["hallucination_per_item"] = hallucination.hallucination_flags(gens, eval_rows, judges)
        except ValueError as err:  # no closed-domain prompt in this eval split
            found.skipped["hallucination"] = str(err)

    with clock.step("truthfulness / toxicity / alignment-tax tables"):
        if tqa_tables:
            tables["truthfulqa"] = pd.DataFrame(tqa_tables)
            tables["truthfulqa_per_item"] = pd.concat(tqa_items, ignore_index=True)
        else:
            found.skipped["truthfulqa"] = "no TruthfulQA questions in the data stage"
        if tox_gens:
            tox_frame = pd.concat(tox_gens, ignore_index=True)
            tables["toxicity_generations"] = tox_frame
            tables["toxicity"] = toxicity.toxicity_table(tox_frame, threshold=TOXIC_ABOVE, scorer=toxicity_scorer,
                                                         n_resamples=n_boot, seed=seed)
            tables["respectful_effect"] = toxicity.respectful_effect(tables["toxicity"])
        else:
            found.skipped["toxicity"] = "no toxicity prompts in the data stage"
        if tax_rows:
            tables["alignment_tax"] = pd.DataFrame(tax_rows)
        if squad_items:
            tables["squad_per_item"] = pd.concat(squad_items, ignore_index=True)
        else:
            found.skipped["squad"] = f"{len(squad_rows)} SQuAD questions: too few for {ev.few_shot_examples}-shot prompts"

    # ---- reward over-optimisation from the PPO runs' logged samples
    oo_summaries: dict[str, Any] = {}
    with clock.step("over-optimisation"):
        ppo_rows = [dict(r) for r in data.split("ppo")]
        parts = []
        for method, run_dir in found.ppo_runs.items():
            samples_path = run_dir / "samples.jsonl"
            if not samples_path.exists() or samples_path.stat().st_size == 0:
                found.skipped[f"overoptimization {method}"] = f"no samples.jsonl in {run_dir}"
                continue
            samples = pd.read_json(samples_path, lines=True)
            table, unmatched = overoptimization_from_samples(samples, ppo_rows, judges, n_resamples=n_boot, seed=seed)
            if unmatched:
                notes.append(f"over-optimisation {method}: {unmatched} logged samples matched no PPO-split prompt (dropped).")
            parts.append(table.assign(method=method, size=size))
            oo_summaries[method] = overoptimization.overoptimization_summary(table)
        if parts:
            tables["overoptimization"] = pd.concat(parts, ignore_index=True)

    # ---- RM generalisation from the reward stage's saved predictions
    rm_headline: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    if found.reward_dir is not None:
        predictions = rm_predictions_with_short_sets(pd.read_csv(found.reward_dir / "predictions.csv"))
        by = ("mode", "set") if "mode" in predictions.columns else ("set",)
        rm_table = generalization.rm_accuracy_table(predictions, by=by, n_resamples=n_boot, seed=seed)
        tables["rm_accuracy"] = rm_table
        kwise = rm_table[rm_table["mode"] == "kwise"] if "mode" in rm_table.columns else rm_table
        rm_headline = {row["set"]: _metric_dict(pd.DataFrame([row])) for _, row in kwise.iterrows()}
        if (found.reward_dir / "agreement.csv").exists():
            for _, row in pd.read_csv(found.reward_dir / "agreement.csv").iterrows():
                agreement[row["group"]] = {"value": float(row["mean"]), "ci_low": float(row["low"]),
                                           "ci_high": float(row["high"]), "n": int(row["n_prompts"])}
    if "DPO" in found.policies and (out / "dpo" / "log_history.csv").exists():
        tables["dpo_log_history"] = pd.read_csv(out / "dpo" / "log_history.csv")

    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    evaluated = [m for m in METHODS if m in set(gens["method"])]
    metrics = {
        "preset": cfg.preset,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "fingerprint": cfg.fingerprint("analysis"),
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "decoding": dec.describe(),
        "baseline": f"{BASELINE}@{size}",
        "judges": {"population": "heldout", "count": len(judges), "noise_scale": noise},
        "counts": {"eval_prompts": len(eval_rows), "truthfulqa_questions": len(tqa_rows), "toxicity_prompts": len(tox_rows),
                   "squad_questions": len(squad_rows), "heldout_documents": len(heldout_texts),
                   "best_of_n": ev.best_of_n, "few_shot_examples": ev.few_shot_examples},
        "methods_evaluated": evaluated,
        "skipped": found.skipped,
        "notes": notes,
        "methods": headline_metrics(tables, evaluated),
        "respectful_effect": (tables["respectful_effect"].set_index("method")[["plain", "respectful", "relative_reduction"]]
                              .to_dict(orient="index") if "respectful_effect" in tables else {}),
        "rm_accuracy": rm_headline,
        "labeler_agreement": agreement,
        "overoptimization": oo_summaries,
        "dpo": json.loads((out / "dpo" / "policy" / "meta.json").read_text()) if (out / "dpo" / "policy").exists() else {},
        "timing_s": {**clock.seconds, "total": clock.total()},
    }
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
    atomic_write_text(out / "upstream.json", json.dumps(upstream, indent=1))
    for method, reason in found.skipped.items():
        print(f"[analysis] skipped {method}: {reason}")


def _train_or_reuse_dpo(cfg: StudyConfig, paths: RunPaths, found: Availability, out: Path, progress: bool) -> Path | None:
    """Train DPO (or reuse a finished run in the stage's work dir), copy it into `out/dpo`; None without pairs."""
    from rlhf_lib.dpo import preference_pairs, train_dpo

    work = _work_dir(cfg, paths) / "dpo"
    if not (work / "policy" / "meta.json").exists():
        rows = pd.read_json(found.reward_dir / "comparisons_train.jsonl", lines=True).to_dict(orient="records")
        pairs = preference_pairs(rows, per_prompt=cfg.evaluation.dpo_pairs_per_prompt)
        if not pairs:
            return None
        shutil.rmtree(work, ignore_errors=True)
        train_dpo(cfg, found.policies["SFT"], pairs, work, progress=progress)
        pd.DataFrame(pairs).to_json(work / "pairs.jsonl", orient="records", lines=True)
    shutil.copytree(work, out / "dpo", dirs_exist_ok=True)
    return out / "dpo" / "policy"


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------------------------
# Reading the results (notebook 05, report)
# --------------------------------------------------------------------------------------------


TEXT_COLUMNS = ("prompt", "completion", "answer", "prediction")


def load_tables(stage_dir: Path | str) -> dict[str, pd.DataFrame]:
    """Every CSV table the stage wrote, by name (absent tables are simply missing from the dict)."""
    stage_dir = Path(stage_dir)
    tables = {}
    for name in TABLES:
        if (stage_dir / f"{name}.csv").exists():
            table = pd.read_csv(stage_dir / f"{name}.csv")
            for column in TEXT_COLUMNS:  # CSV turns empty completions into NaN; they are empty strings
                if column in table.columns:
                    table[column] = table[column].fillna("").astype(str)
            tables[name] = table
    return tables


def load_metrics(stage_dir: Path | str) -> dict[str, Any]:
    """The metrics.json of an analysis stage (or a results folder); a clear error when it is missing or torn.

    run_analysis_stage recomputes a stage whose metrics.json is torn, so after it this only fails on a results
    folder, whose copy the next analysis run (or `run_all.py --only analysis --force`) rewrites.
    """
    path = Path(stage_dir) / "metrics.json"
    metrics = read_json(path)  # warns when torn
    if not isinstance(metrics, dict):
        raise FileNotFoundError(f"{path} is missing or unreadable (torn by an interrupted write?). Rerun the analysis: "
                                f"`python run_all.py --only analysis --force` (its stage recomputes a torn metrics.json).")
    return metrics


def export_results(stage_dir: Path | str, results_dir: Path | str, reward_dir: Path | str | None = None) -> list[Path]:
    """Copy the stage's tables and metrics.json into results_dir (the rendered, shareable results), then
    write results_dir/findings.json from those copies (rlhf_lib.findings).

    `reward_dir` (a finished reward stage) supplies the RM predictions and the stage's time; without it
    the findings fall back to results_dir's rm_predictions.csv and run_record.json, and list as missing
    whatever neither has.
    """
    from rlhf_lib.findings import write_findings

    stage_dir, results_dir = Path(stage_dir), Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(stage_dir.glob("*.csv")) + [stage_dir / "metrics.json"]:
        if path.exists():
            target = results_dir / ("analysis_" + path.name if path.suffix == ".csv" else path.name)
            atomic_copy_file(path, target)  # a reader (report.py, SUMMARY.md) never sees half a file
            copied.append(target)
    copied.append(write_findings(results_dir, reward_dir=reward_dir))
    return copied


def recheck_from_saved(cfg: StudyConfig, paths: RunPaths, results_dir: Path | str) -> pd.DataFrame:
    """Recompute headline numbers from the shared files alone, beside the numbers metrics.json reports.

    Reads results_dir/analysis_generations.csv and analysis_truthfulqa_per_item.csv (what a reader of the
    rendered study has), the data stage's prompts and questions, and the reward stage's labeler noise.
    Win rates vs SFT are re-judged by a freshly built held-out labeler population; TruthfulQA MC1 comes
    from each question's chosen choice and its labels, "true & informative" from re-judging the saved
    answers. Columns: metric, method, reported, recomputed. A mismatch means the files and the report
    disagree::

        study = open_study("tiny"); recheck_from_saved(study.cfg, study.paths, study.results_dir)
    """
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.evaluation import preference, truthfulness

    results_dir = Path(results_dir)
    metrics = load_metrics(results_dir)
    data = StudyData.load(paths.require("data") / "study")
    judges, _ = heldout_judges(cfg, paths.stage("reward") if paths.is_done("reward") else None)
    gens = pd.read_csv(results_dir / "analysis_generations.csv", keep_default_na=False)
    rows = []
    wins = preference.win_rate_table(gens, [dict(r) for r in data.split("eval")], judges, baseline_method=BASELINE,
                                     n_resamples=10, seed=cfg.seed)
    for _, win in wins.iterrows():
        reported = metrics["methods"][win["method"]][f"win_rate_vs_{BASELINE}"]["value"]
        rows.append({"metric": f"win_rate_vs_{BASELINE}", "method": win["method"], "reported": reported,
                     "recomputed": win["value"]})
    per_item_path = results_dir / "analysis_truthfulqa_per_item.csv"
    if per_item_path.exists():
        questions = {r["id"]: dict(r) for r in data.truthfulqa}
        per_item = pd.read_csv(per_item_path, keep_default_na=False)
        for method, items in per_item.groupby("method", sort=False):
            mc1 = [float(questions[q]["mc_labels"][c] == 1) for q, c in zip(items["id"], items["chosen"], strict=True)]
            judged = truthfulness.judge_generated([questions[q] for q in items["id"]], list(items["answer"]))
            for key, value in (("truthfulqa_mc1", np.mean(mc1)), ("truthfulqa_true_informative", judged["true_informative"].mean())):
                rows.append({"metric": key, "method": method, "reported": metrics["methods"][method][key]["value"],
                             "recomputed": float(value)})
    return pd.DataFrame(rows, columns=["metric", "method", "reported", "recomputed"])


# --------------------------------------------------------------------------------------------
# Across sizes: Figure 1 with one baseline for every size
# --------------------------------------------------------------------------------------------

CROSS_SIZE_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx")  # the lines of the paper's Figure 1 (few-shot GPT: per size, in 05)
CROSS_SIZE_TABLE, CROSS_SIZE_GENERATIONS, CROSS_SIZE_KEY = "cross_size_win_rate.csv", "cross_size_generations.csv", "cross_size.json"


def _answer(cfg: StudyConfig, paths: RunPaths, rows: Sequence[Mapping[str, Any]], progress: bool) -> pd.DataFrame:
    """Greedy answers of one size's GPT / SFT / PPO / PPO-ptx to the given prompt rows (that size's decoding)."""
    from rlhf_lib.prompting import format_prompt

    found = find_upstream(paths)
    bank = PolicyBank(cfg, found.policies["SFT"])
    for method in CROSS_SIZE_METHODS:
        if method in found.policies and method != "SFT":
            bank.add(method, found.policies[method])
    texts = [format_prompt(bank.tokenizer, r["prompt"]) for r in rows]
    dec, parts = Decoding.from_config(cfg), []
    for method in [m for m in CROSS_SIZE_METHODS if m == "GPT" or m in found.policies]:
        with bank.use(method) as model:
            completions = _generate(model, bank.tokenizer, texts, dec, f"{cfg.preset} {method} (cross-size prompts)", progress)
        parts.append(pd.DataFrame({"method": method, "size": cfg.preset, "prompt_id": [r["id"] for r in rows],
                                   "prompt": [r["prompt"] for r in rows], "completion": completions}))
    del bank
    gc.collect()
    return pd.concat(parts, ignore_index=True)


def cross_size_win_rates(
    studies: Sequence[tuple[StudyConfig, RunPaths]], out_dir: Path | str, progress: bool = True
) -> pd.DataFrame | None:
    """Win rate of every method x size against SFT at the largest size run (the paper's Figure 1).

    All sizes answer the same prompts, the largest size's held-out eval prompts, and the largest size's
    held-out labelers judge them (its reward stage calibrated their noise). The largest size's outputs are
    its analysis stage's generations; every other size's policies answer here, greedily. Needs two or
    more sizes with a finished analysis (else None). Writes CROSS_SIZE_TABLE and CROSS_SIZE_GENERATIONS
    to out_dir and reuses them while no size's analysis has finished again since (CROSS_SIZE_KEY).
    """
    from rlhf_lib.config import PRESETS
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.evaluation import preference

    done = [(cfg, paths) for cfg, paths in studies if paths.is_done("analysis")]
    if len({cfg.preset for cfg, _ in done}) < 2:
        return None
    largest_cfg, largest_paths = max(done, key=lambda s: PRESETS.index(s[0].preset) if s[0].preset in PRESETS else -1)
    out_dir = Path(out_dir)
    key = {"largest": largest_cfg.preset, "analysis_finished": {cfg.preset: _done_record(paths, "analysis")["finished_utc"]
                                                                 for cfg, paths in done}}
    table_path, key_path = out_dir / CROSS_SIZE_TABLE, out_dir / CROSS_SIZE_KEY
    if table_path.exists() and read_json(key_path) == key:
        return pd.read_csv(table_path)

    rows = [dict(r) for r in StudyData.load(largest_paths.require("data") / "study").split("eval")]
    judges, _ = heldout_judges(largest_cfg, find_upstream(largest_paths).reward_dir)
    largest = load_tables(largest_paths.stage("analysis"))["generations"]
    parts = [largest[largest["method"].isin(CROSS_SIZE_METHODS)]]
    parts += [_answer(cfg, paths, rows, progress) for cfg, paths in done if cfg.preset != largest_cfg.preset]
    gens = sort_frame(pd.concat(parts, ignore_index=True))
    table = preference.win_rate_table(gens, rows, judges, baseline_method=BASELINE, baseline_size=largest_cfg.preset,
                                      n_resamples=largest_cfg.evaluation.bootstrap_samples, seed=largest_cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / CROSS_SIZE_GENERATIONS, gens.to_csv(index=False))
    atomic_write_text(table_path, table.to_csv(index=False))
    atomic_write_text(key_path, json.dumps(key, indent=1))  # last: the key vouches for the two tables
    return table
