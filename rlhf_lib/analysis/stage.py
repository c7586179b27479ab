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
- DPO: the SFT policy trained by DPO on the RM's comparisons (rlhf_lib.dpo), trained here.

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

This module holds the stage itself: `run_analysis_stage` (the cache) and `_run`, whose steps each come from the
module of their notebook-05 section (policies, baselines, preference, benchmarks, overoptimization, reward_model;
the tables and metrics.json: tables).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rlhf_lib.analysis.baselines import _train_or_reuse_dpo, _work_dir, pick_best_of_n, sample_best_of_n
from rlhf_lib.analysis.benchmarks import BenchmarkItems, BenchmarkProbes, add_hallucination_tables
from rlhf_lib.analysis.overoptimization import add_overoptimization_table
from rlhf_lib.analysis.policies import (
    Availability,
    Decoding,
    PolicyBank,
    _generate,
    few_shot_demonstrations,
    find_upstream,
    heldout_judges,
    upstream_state,
)
from rlhf_lib.analysis.preference import BASELINE, add_preference_tables
from rlhf_lib.analysis.reward_model import add_rm_accuracy_table
from rlhf_lib.analysis.tables import headline_metrics
from rlhf_lib.config import StudyConfig
from rlhf_lib.evaluation import METHODS
from rlhf_lib.evaluation.base import sort_frame
from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.pipeline import RunPaths, cached_stage

if TYPE_CHECKING:
    from rlhf_lib.data.study import StudyData


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


def _run(cfg: StudyConfig, paths: RunPaths, out: Path, upstream: dict, progress: bool) -> None:
    """The stage's steps in order, each a function of its notebook-05 section's module; writes the tables,
    metrics.json and upstream.json into `out`."""
    from rlhf_lib.data.study import StudyData

    clock = _Clock(progress)
    ev, size, seed, n_boot = cfg.evaluation, cfg.preset, cfg.seed, cfg.evaluation.bootstrap_samples
    dec = Decoding.from_config(cfg)
    data = StudyData.load(paths.require("data") / "study")
    found = find_upstream(paths)
    notes: list[str] = []
    eval_rows = [dict(r) for r in data.split("eval")]
    items = BenchmarkItems.from_data(data, ev.max_items)
    judges, noise = heldout_judges(cfg, found.reward_dir)

    # ---- DPO first: it loads its own copy of the SFT model, freed before the evaluation bank loads.
    if found.reward_dir is not None:
        with clock.step("DPO training"):
            dpo_policy = _train_or_reuse_dpo(cfg, paths, found, out, progress)
        if dpo_policy is not None:
            found.policies["DPO"] = dpo_policy
        else:
            found.skipped["DPO"] = "no untied preference pair in the RM comparisons"

    generations, best_candidates, probes = _evaluate_methods(cfg, data, found, eval_rows, items, dec, clock, progress)

    tables: dict[str, pd.DataFrame] = {}
    # ---- best-of-n: score the SFT samples with the RM (loaded only now, after the policies are freed).
    if found.reward_dir is not None and best_candidates:
        with clock.step("best-of-n: RM scoring"):
            candidates, best_of_n = pick_best_of_n(found.reward_dir, eval_rows, best_candidates, cfg, dec)
            tables["best_of_n_candidates"] = candidates
            generations.append(best_of_n)
        if cfg.generation.temperature == 0:
            notes.append("best-of-n: generation.temperature is 0, so its n samples are identical (best-of-n = SFT greedy).")

    gens = sort_frame(pd.concat(generations, ignore_index=True))  # METHODS order, prompts in eval order
    tables["generations"] = gens

    # ---- judged by held-out labelers
    with clock.step("preference (held-out labelers)"):
        add_preference_tables(tables, gens, eval_rows, judges, n_boot, seed)
        add_hallucination_tables(tables, found.skipped, gens, eval_rows, judges, n_boot, seed)

    with clock.step("truthfulness / toxicity / alignment-tax tables"):
        probes.add_tables(tables, found.skipped)

    # ---- reward over-optimisation from the PPO runs' logged samples
    with clock.step("over-optimisation"):
        ppo_rows = [dict(r) for r in data.split("ppo")]
        oo_summaries = add_overoptimization_table(tables, found, ppo_rows, judges, cfg, notes)

    # ---- RM generalisation from the reward stage's saved predictions
    rm_headline: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    if found.reward_dir is not None:
        rm_headline, agreement = add_rm_accuracy_table(tables, found.reward_dir, n_boot, seed)
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
        "counts": {"eval_prompts": len(eval_rows), "truthfulqa_questions": len(items.truthfulqa),
                   "toxicity_prompts": len(items.toxicity), "squad_questions": len(items.squad),
                   "heldout_documents": len(items.heldout_texts),
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


def _evaluate_methods(
    cfg: StudyConfig, data: StudyData, found: Availability, eval_rows: list[dict[str, Any]], items: BenchmarkItems,
    dec: Decoding, clock: _Clock, progress: bool,
) -> tuple[list[pd.DataFrame], list[str], BenchmarkProbes]:
    """Every policy in turn on one base model (PolicyBank), the bank freed after: each method's answers to the eval
    prompts (GPT prompted with the few-shot prefix), the SFT policy's best-of-n candidates and the benchmark probes."""
    from rlhf_lib.prompting import few_shot_prompt, format_prompt

    ev, size, seed = cfg.evaluation, cfg.preset, cfg.seed
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

    generations: list[pd.DataFrame] = []
    best_candidates: list[str] = []
    probes = BenchmarkProbes(cfg, items, dec, progress)
    for method in [m for m in methods if m != "best-of-n"]:
        with bank.use(method) as model, clock.step(f"{method}: all metrics"):
            texts = prompted if method == "GPT prompted" else plain_prompts
            completions = _generate(model, tok, texts, dec, f"{method} (eval prompts)", progress)
            generations.append(pd.DataFrame({"method": method, "size": size, "prompt_id": [r["id"] for r in eval_rows],
                                             "prompt": [r["prompt"] for r in eval_rows], "completion": completions}))
            if method == "SFT" and found.reward_dir is not None and ev.best_of_n > 0:
                best_candidates = sample_best_of_n(model, tok, plain_prompts, cfg, dec, progress)
            probes.probe(model, tok, method)
    del bank
    gc.collect()
    return generations, best_candidates, probes


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
