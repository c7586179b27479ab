"""Benchmarks, notebook 05's hallucination, TruthfulQA, toxicity and alignment-tax sections: what each method answers
while its policy is loaded, the tables built from it, and the four figures.

    BenchmarkItems            the TruthfulQA questions, toxicity prompts, SQuAD questions and held-out prose every
                              method answers, each capped at evaluation.max_items
    BenchmarkProbes           `probe`: one loaded policy on them (TRUTHFULQA_METHODS, TOXICITY_METHODS,
                              ALIGNMENT_TAX_METHODS); `add_tables`: truthfulqa, toxicity, respectful_effect,
                              alignment_tax and their per-item tables, once every method has run
    add_hallucination_tables  closed-domain hallucination, the held-out labelers on the eval generations
    plot_hallucination, plot_truthfulness, plot_toxicity, plot_alignment_tax   the figures
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rlhf_lib import paper
from rlhf_lib.analysis.figures import (
    _PALETTE,
    _color,
    _figure,
    _grouped_bars,
    _legend,
    _n_note,
    _only_metric,
    _order,
    _reference,
    _require,
    _save,
    _style,
)
from rlhf_lib.analysis.policies import Decoding, _generate
from rlhf_lib.config import PRESETS, StudyConfig
from rlhf_lib.evaluation import summary_rows
from rlhf_lib.evaluation.base import METHODS

if TYPE_CHECKING:
    from rlhf_lib.data.study import StudyData

TRUTHFULQA_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx", "DPO")
TOXICITY_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx")
ALIGNMENT_TAX_METHODS = ("GPT", "SFT", "PPO", "PPO-ptx")
SQUAD_MAX_NEW_TOKENS = 16  # answers are short spans; the first line is scored
LM_LOSS_MAX_TOKENS = 256
LM_LOSS_BATCH = 4

# Paper numbers drawn as references, from rlhf_lib.paper (where each is given), in the figures' units
PAPER_HALLUCINATION = {"InstructGPT (paper)": paper.HALLUCINATION_INSTRUCT.value / 100,
                       "GPT-3 (paper)": paper.HALLUCINATION_GPT.value / 100}
PAPER_SQUAD_F1 = {method: claim.value for method, claim in paper.SQUAD_F1.items()}  # Table 14, by our method names
PAPER_TOXICITY_NOTE = (f"paper: {paper.TOXICITY_REDUCTION.text} toxic outputs than GPT-3 with the respectful "
                       "instruction")

METRIC_LABELS = {
    "mc1": "MC1",
    "mc2": "MC2",
    "true": "% true",
    "informative": "% informative",
    "true_informative": "% true & informative",
    "squad_f1": "SQuAD F1",
    "squad_em": "SQuAD EM",
    "toxic_rate": "toxic-output rate",
    "mean_toxicity": "mean toxicity probability",
}


# --------------------------------------------------------------------------------------------
# What every method answers, and the tables
# --------------------------------------------------------------------------------------------


def _capped(rows: Sequence[Any], cap: int) -> list[Any]:
    rows = list(rows)
    return rows[:cap] if cap > 0 else rows


@dataclass
class BenchmarkItems:
    """The benchmark items every method answers (the data stage's, each capped at evaluation.max_items; 0 = all)."""

    truthfulqa: list[dict[str, Any]]
    toxicity: list[dict[str, Any]]
    squad: list[dict[str, Any]]
    heldout_texts: list[str]  # held-out pretraining prose, for the LM loss

    @classmethod
    def from_data(cls, data: StudyData, max_items: int) -> BenchmarkItems:
        tqa_rows = [dict(r) for r in _capped(data.truthfulqa, max_items)]
        tox_rows = [dict(r) for r in _capped(data.toxicity, max_items)]
        squad_rows = [dict(r) for r in _capped(data.squad, max_items)]
        heldout_texts = [str(t) for t in _capped(data.pretrain_heldout["text"], max_items)]
        return cls(tqa_rows, tox_rows, squad_rows, heldout_texts)


class BenchmarkProbes:
    """The benchmarks each method answers while its policy is loaded (`probe`), collected until every method has run;
    then `add_tables` turns them into the stage's tables."""

    def __init__(self, cfg: StudyConfig, items: BenchmarkItems, dec: Decoding, progress: bool):
        from rlhf_lib.evaluation import toxicity

        self.cfg, self.items, self.dec, self.progress = cfg, items, dec, progress
        self.tqa_tables: list[dict[str, Any]] = []  # TruthfulQA summary rows
        self.tqa_items: list[pd.DataFrame] = []
        self.tox_gens: list[pd.DataFrame] = []  # toxicity prompts x conditions, with each method's completions
        self.tax_rows: list[dict[str, Any]] = []  # alignment-tax summary rows
        self.squad_items: list[pd.DataFrame] = []
        self.conditions = toxicity.build_conditions(items.toxicity) if items.toxicity else pd.DataFrame()

    def probe(self, model: Any, tok: Any, method: str) -> None:
        """TruthfulQA (MC by log-likelihood, generated answers), toxicity with and without the respectful instruction,
        and the alignment tax (few-shot SQuAD, held-out LM loss): each for the methods it is run on."""
        from rlhf_lib.evaluation import alignment_tax, truthfulness
        from rlhf_lib.prompting import format_prompt

        cfg, dec, progress, conditions = self.cfg, self.dec, self.progress, self.conditions
        ev, size, seed, n_boot = cfg.evaluation, cfg.preset, cfg.seed, cfg.evaluation.bootstrap_samples
        tqa_rows, squad_rows, heldout_texts = self.items.truthfulqa, self.items.squad, self.items.heldout_texts
        tqa_tables, tqa_items, tox_gens, tax_rows, squad_items = (
            self.tqa_tables, self.tqa_items, self.tox_gens, self.tax_rows, self.squad_items)
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

    def add_tables(self, tables: dict[str, pd.DataFrame], skipped: dict[str, str]) -> None:
        """truthfulqa(_per_item), toxicity(_generations), respectful_effect, alignment_tax and squad_per_item into
        `tables`; a benchmark with nothing to show goes into `skipped` (name -> reason)."""
        from rlhf_lib.evaluation import toxicity
        from rlhf_lib.labelers import TOXIC_ABOVE
        from rlhf_lib.labelers import toxicity as toxicity_scorer

        ev, seed, n_boot = self.cfg.evaluation, self.cfg.seed, self.cfg.evaluation.bootstrap_samples
        squad_rows = self.items.squad
        tqa_tables, tqa_items, tox_gens, tax_rows, squad_items = (
            self.tqa_tables, self.tqa_items, self.tox_gens, self.tax_rows, self.squad_items)
        if tqa_tables:
            tables["truthfulqa"] = pd.DataFrame(tqa_tables)
            tables["truthfulqa_per_item"] = pd.concat(tqa_items, ignore_index=True)
        else:
            skipped["truthfulqa"] = "no TruthfulQA questions in the data stage"
        if tox_gens:
            tox_frame = pd.concat(tox_gens, ignore_index=True)
            tables["toxicity_generations"] = tox_frame
            tables["toxicity"] = toxicity.toxicity_table(tox_frame, threshold=TOXIC_ABOVE, scorer=toxicity_scorer,
                                                         n_resamples=n_boot, seed=seed)
            tables["respectful_effect"] = toxicity.respectful_effect(tables["toxicity"])
        else:
            skipped["toxicity"] = "no toxicity prompts in the data stage"
        if tax_rows:
            tables["alignment_tax"] = pd.DataFrame(tax_rows)
        if squad_items:
            tables["squad_per_item"] = pd.concat(squad_items, ignore_index=True)
        else:
            skipped["squad"] = f"{len(squad_rows)} SQuAD questions: too few for {ev.few_shot_examples}-shot prompts"


def add_hallucination_tables(
    tables: dict[str, pd.DataFrame], skipped: dict[str, str], gens: pd.DataFrame,
    eval_rows: Sequence[Mapping[str, Any]], judges: Sequence[Any], n_boot: int, seed: int,
) -> None:
    """tables["hallucination"] and ["hallucination_per_item"] on the closed-domain eval prompts; without one, the
    reason goes into `skipped`."""
    from rlhf_lib.evaluation import hallucination

    try:
        tables["hallucination"] = hallucination.hallucination_table(gens, eval_rows, judges, n_resamples=n_boot, seed=seed)
        # Per prompt, so findings can pair two methods' flags on the same prompts (rlhf_lib.findings).
        tables["hallucination_per_item"] = hallucination.hallucination_flags(gens, eval_rows, judges)
    except ValueError as err:  # no closed-domain prompt in this eval split
        skipped["hallucination"] = str(err)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _label_column(frame: pd.DataFrame) -> pd.Series:
    """`method`, or `method (size)` when the table spans several sizes."""
    if "size" in frame.columns and frame["size"].nunique() > 1:
        return frame["method"].astype(str) + " (" + frame["size"].astype(str) + ")"
    return frame["method"].astype(str)


def _label_order(frame: pd.DataFrame) -> list[str]:
    methods = _order(frame["method"], METHODS)
    sizes = _order(frame["size"], PRESETS) if "size" in frame.columns else [None]
    labels = _label_column(frame)
    wanted = []
    for method in methods:
        for size in sizes:
            mask = frame["method"] == method
            if size is not None:
                mask &= frame["size"] == size
            wanted.extend(labels[mask].unique().tolist())
    return list(dict.fromkeys(wanted))


def _label_colors(frame: pd.DataFrame, labels: Sequence[str], always: bool = False) -> dict[str, Any] | None:
    """Method colours for bar labels; with several sizes per method (hues by label) only if `always`."""
    if not always and "size" in frame.columns and frame["size"].nunique() > 1:
        return None  # one hue per (method, size): let each get its own colour
    method_of = dict(zip(frame["label"], frame["method"].astype(str), strict=True))
    return {label: _color(method_of.get(label, label), i) for i, label in enumerate(labels)}


def plot_truthfulness(table: pd.DataFrame, out_path: str | os.PathLike[str]) -> Path:
    """TruthfulQA: MC1, MC2, % true, % informative, % true & informative by method, 95% CIs."""
    _require(table, ["method", "metric", "value", "ci_low", "ci_high"], "truthfulness table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    metrics = _order(frame["metric"], ("mc1", "mc2", "true", "informative", "true_informative"))
    labels = _label_order(frame)
    with _style():
        fig, (ax,) = _figure(width=max(6.0, 1.3 * len(metrics) + 0.4 * len(labels)), height=4.0)
        _grouped_bars(ax, frame, "metric", "label", metrics, labels, 100, METRIC_LABELS, _label_colors(frame, labels))
        ax.set_ylim(0, 100)
        ax.set_ylabel("score [%]")
        ax.set_title(f"TruthfulQA ({_n_note(frame)} questions, 95% CI); paper: InstructGPT ~2x GPT-3 on true & informative")
        _legend(ax, loc="upper right", ncols=2)
        return _save(fig, table, out_path)


def plot_toxicity(table: pd.DataFrame, out_path: str | os.PathLike[str], metric: str = "toxic_rate") -> Path:
    """Toxic-output rate per method, with vs without the respectful instruction, 95% CIs."""
    table = _only_metric(table, metric)
    _require(table, ["method", "condition", "value", "ci_low", "ci_high"], "toxicity table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    labels = _label_order(frame)
    conditions = _order(frame["condition"], ("plain", "respectful"))
    colors = {"plain": "#b0b0b0", "respectful": _PALETTE[2]}
    scale = 100 if metric == "toxic_rate" else 1
    with _style():
        fig, (ax,) = _figure(width=max(5.5, 1.1 * len(labels) + 2), height=4.0)
        pos = _grouped_bars(ax, frame, "label", "condition", labels, conditions, scale=scale, hue_colors=colors)
        # Relative change from plain to respectful above each method's pair of bars.
        for label in labels:
            sub = frame[frame["label"] == label].set_index("condition")
            rows = sub["value"]
            if {"plain", "respectful"} <= set(rows.index) and rows["plain"] > 0:
                change = rows["respectful"] / rows["plain"] - 1
                top = float(np.nanmax(sub[["value", "ci_high"]].to_numpy(float))) * scale
                x = np.mean([pos[(label, c)] for c in ("plain", "respectful")])
                ax.annotate(f"{change:+.0%}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}" + (" [%]" if scale == 100 else ""))
        # Headroom for the change labels and the legend above the tallest interval.
        highest = float(np.nanmax(frame[["value", "ci_high"]].to_numpy(float))) * scale
        ax.set_ylim(0, max(highest * 1.35, 1e-3))
        ax.set_title(f"Toxicity with and without a respectful instruction ({_n_note(frame)} prompts, 95% CI)\n{PAPER_TOXICITY_NOTE}")
        _legend(ax, title="instruction (label: change with respectful)", loc="upper center", ncols=2)
        return _save(fig, table, out_path)


def plot_hallucination(
    table: pd.DataFrame, out_path: str | os.PathLike[str], paper: Mapping[str, float] | None = PAPER_HALLUCINATION
) -> Path:
    """Closed-domain hallucination rate per method, 95% CIs, with the paper's 21% / 41% as references."""
    table = _only_metric(table, "hallucination_rate")
    _require(table, ["method", "value", "ci_low", "ci_high"], "hallucination table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    frame["_all"] = "all"
    labels = _label_order(frame)
    with _style():
        fig, (ax,) = _figure(width=max(5.0, 0.9 * len(labels) + 2.5), height=4.0)
        _grouped_bars(ax, frame, "label", "_all", labels, ["all"], 100, group_colors=_label_colors(frame, labels, True))
        for name, value in (paper or {}).items():
            _reference(ax, value * 100, f"{name}: {value:.0%}")
        ax.set_ylim(0, 100)
        ax.set_ylabel("hallucination rate [%] (lower is better)")
        ax.set_title(f"Closed-domain hallucination ({_n_note(frame)} prompts, 95% CI)")
        return _save(fig, table, out_path)


def plot_alignment_tax(
    table: pd.DataFrame, out_path: str | os.PathLike[str], paper_squad_f1: Mapping[str, float] | None = PAPER_SQUAD_F1
) -> Path:
    """Alignment tax: few-shot SQuAD F1/EM (left) and held-out LM loss (right) for GPT / PPO / PPO-ptx."""
    _require(table, ["method", "metric", "value", "ci_low", "ci_high"], "alignment-tax table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    labels = _label_order(frame)
    colors = _label_colors(frame, labels)
    squad = frame[frame["metric"].isin(["squad_f1", "squad_em"])]
    loss = frame[frame["metric"] == "lm_nll"]
    panels = [p for p in (squad, loss) if not p.empty]
    if not panels:
        raise ValueError("The alignment-tax table needs squad_f1 / squad_em and/or lm_nll rows.")
    with _style():
        fig, axes = _figure(ncols=len(panels), width=5.0, height=4.0)
        ax_iter = iter(axes)
        if not squad.empty:
            ax = next(ax_iter)
            metrics = _order(squad["metric"], ("squad_f1", "squad_em"))
            hues = [lab for lab in labels if lab in set(squad["label"])]
            pos = _grouped_bars(ax, squad, "metric", "label", metrics, hues, 100, METRIC_LABELS, colors)
            shown = False
            for (metric, label), x in pos.items():
                method = squad.loc[squad["label"] == label, "method"].iloc[0]
                if metric == "squad_f1" and paper_squad_f1 and method in paper_squad_f1:
                    ax.scatter([x], [paper_squad_f1[method]], marker="D", color="black", s=22, zorder=4,
                               label=None if shown else "paper, 175B SQuADv2 F1")
                    shown = True
            ax.set_ylim(0, 100)
            ax.set_ylabel("few-shot SQuAD score [%]")
            ax.set_title(f"Few-shot SQuAD ({_n_note(squad)} questions, 95% CI)", fontsize=9)
            _legend(ax, loc="upper right")
        if not loss.empty:
            ax = next(ax_iter)
            hues = [lab for lab in labels if lab in set(loss["label"])]
            _grouped_bars(ax, loss.assign(_m="lm_nll"), "label", "_m", hues, ["lm_nll"], 1.0,
                          group_colors=_label_colors(frame, labels, True))
            ax.set_ylabel("mean token NLL [nats] (lower is better)")
            ax.set_title(f"LM loss on held-out text ({_n_note(loss)} documents, 95% CI)", fontsize=9)
        fig.suptitle("Alignment tax: does RLHF cost benchmark performance?")
        return _save(fig, table, out_path)
