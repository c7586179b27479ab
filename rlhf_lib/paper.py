"""Every number of the paper this study compares against, with where the paper gives it.

InstructGPT: Ouyang et al. (2022), "Training language models to follow instructions with human
feedback", arXiv 2203.02155. Used by `rlhf_lib.findings` (findings.json's "paper" and verdicts) and
`rlhf_lib.report` (SUMMARY.md), so a number is typed once::

    from rlhf_lib import paper
    paper.RM_ACCURACY_TRAIN.value        # 72.4 (percent)
    paper.CLAIMS["rm_accuracy_heldout"]  # PaperClaim(...)

`value` is in the claim's `unit`; `no_effect` is the value at which the effect the paper reports would
vanish (50% for accuracies and win rates: chance / a tie; 0 for a difference between two methods) and
`side` says on which side of it the paper's number lies. A claim the paper makes only as a direction (a
figure, no number in the text) has `value=None`; its verdict is still decided by the side of no effect.
A claim without `no_effect` is a number this study sets by design (BY_DESIGN says how): no verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PAPER = "Ouyang et al. (2022), Training language models to follow instructions with human feedback, arXiv 2203.02155"


@dataclass(frozen=True)
class PaperClaim:
    """One number (or direction) of the paper, with its unit, where it is given and what 'no effect' is."""

    value: float | None  # in `unit`; None when the paper gives a direction only
    unit: str
    where: str  # table / figure / section of the paper
    text: str  # how the paper states it, for tables
    no_effect: float | None = None  # the value at which the paper's effect would vanish
    side: Literal["above", "below"] | None = None  # the paper's value relative to no_effect
    plus_minus: float | None = None


RM_ACCURACY_TRAIN = PaperClaim(
    72.4, "percent", "appendix C.2 / section 4", "72.4 ± 0.4% (6B RM)", no_effect=50.0, side="above",
    plus_minus=0.4,
)
RM_ACCURACY_HELDOUT = PaperClaim(
    69.6, "percent", "appendix C.2 / section 4", "69.6 ± 0.9% (6B RM)", no_effect=50.0, side="above",
    plus_minus=0.9,
)
AGREEMENT_TRAIN = PaperClaim(72.6, "percent", "section 3.4 (inter-labeler agreement)", "72.6 ± 1.5%", plus_minus=1.5)
AGREEMENT_HELDOUT = PaperClaim(77.3, "percent", "section 3.4 (inter-labeler agreement)", "77.3 ± 1.3%", plus_minus=1.3)
WIN_VS_GPT = PaperClaim(
    85.0, "percent", "section 4.1 / Figure 1 (175B InstructGPT vs 175B GPT-3)", "85 ± 3% (175B vs 175B)",
    no_effect=50.0, side="above", plus_minus=3.0,
)
WIN_VS_GPT_PROMPTED = PaperClaim(
    71.0, "percent", "section 4.1 / Figure 1 (175B InstructGPT vs few-shot 175B GPT-3)", "71 ± 4% (175B)",
    no_effect=50.0, side="above", plus_minus=4.0,
)
# Figure 1 plots PPO and PPO-ptx above the 175B SFT baseline at every size; the text gives no number.
WIN_PPO_VS_SFT = PaperClaim(
    None, "percent", "Figure 1 (direction only: PPO above SFT at every size)", "above 50% (Figure 1, no number in the text)",
    no_effect=50.0, side="above",
)
WIN_PPO_PTX_VS_SFT = PaperClaim(
    None, "percent", "Figure 1 (direction only: PPO-ptx above SFT at every size)",
    "above 50% (Figure 1, no number in the text)", no_effect=50.0, side="above",
)
HALLUCINATION_INSTRUCT = PaperClaim(21.0, "percent", "section 4.2 / Figure 4 (closed-domain)", "21% (InstructGPT)")
HALLUCINATION_GPT = PaperClaim(41.0, "percent", "section 4.2 / Figure 4 (closed-domain)", "41% (GPT-3)")
TRUTHFULQA_RATIO = PaperClaim(2.0, "ratio", "section 4.2 / Figure 6", "about 2x")
TOXICITY_REDUCTION = PaperClaim(25.0, "percent", "section 4.2 / Figure 7 (respectful instruction)", "about 25% fewer")
SQUAD_F1 = {  # Table 14, 175B, few-shot SQuADv2 F1
    "GPT": PaperClaim(69.75, "F1", "Table 14 (175B, few-shot SQuADv2)", "69.75"),
    "PPO": PaperClaim(51.95, "F1", "Table 14 (175B, few-shot SQuADv2)", "51.95"),
    "PPO-ptx": PaperClaim(69.93, "F1", "Table 14 (175B, few-shot SQuADv2)", "69.93"),
}


# Differences between two methods on the same items (method minus baseline), in points; no effect is 0.
SQUAD_TAX = PaperClaim(
    round(SQUAD_F1["PPO"].value - SQUAD_F1["GPT"].value, 2), "F1 points", "Table 14 (175B, few-shot SQuADv2)",
    "PPO 51.95 vs GPT 69.75: 17.8 F1 lower (the alignment tax)", no_effect=0.0, side="below",
)
SQUAD_RECOVERY = PaperClaim(
    round(SQUAD_F1["PPO-ptx"].value - SQUAD_F1["PPO"].value, 2), "F1 points", "Table 14 (175B, few-shot SQuADv2)",
    "PPO-ptx 69.93 vs PPO 51.95: 18.0 F1 higher (pretraining mix recovers the tax)", no_effect=0.0, side="above",
)
HALLUCINATION_FEWER = PaperClaim(
    HALLUCINATION_INSTRUCT.value - HALLUCINATION_GPT.value, "percentage points",
    "section 4.2 / Figure 4 (closed-domain)", "21% vs 41%: 20 points fewer (InstructGPT vs GPT-3)",
    no_effect=0.0, side="below",
)
TRUTHFULQA_MORE = PaperClaim(
    None, "percentage points", "section 4.2 / Figure 6", "true & informative about twice as often as GPT-3 (direction)",
    no_effect=0.0, side="above",
)
TOXICITY_FEWER = PaperClaim(
    None, "percentage points", "section 4.2 / Figure 7 (respectful instruction)",
    "less toxic than GPT-3 with the respectful instruction, about 25% fewer (direction)", no_effect=0.0, side="below",
)
# Section 4.2 (human evaluations): "Our SFT baseline is the least toxic out of all of our models".
SFT_LEAST_TOXIC_TEXT = "the SFT baseline is the least toxic of the paper's models (direction)"
PPO_MORE_TOXIC_THAN_SFT = PaperClaim(
    None, "percentage points", "section 4.2 / Figure 7 (human evaluations)", SFT_LEAST_TOXIC_TEXT,
    no_effect=0.0, side="above",
)
SFT_LESS_TOXIC_THAN_GPT = PaperClaim(
    None, "percentage points", "section 4.2 / Figure 7 (human evaluations)", SFT_LEAST_TOXIC_TEXT,
    no_effect=0.0, side="below",
)

# findings.json metric name -> the paper's claim about it (metrics without one have no entry).
CLAIMS: dict[str, PaperClaim] = {
    "rm_accuracy_train": RM_ACCURACY_TRAIN,
    "rm_accuracy_heldout": RM_ACCURACY_HELDOUT,
    "agreement_train": AGREEMENT_TRAIN,
    "agreement_heldout": AGREEMENT_HELDOUT,
    "win_rate_ppo_vs_sft": WIN_PPO_VS_SFT,
    "win_rate_ppo_ptx_vs_sft": WIN_PPO_PTX_VS_SFT,
    "win_rate_ppo_ptx_vs_gpt": WIN_VS_GPT,
    "win_rate_ppo_ptx_vs_gpt_prompted": WIN_VS_GPT_PROMPTED,
    "hallucination_rate_ppo_ptx_minus_gpt": HALLUCINATION_FEWER,
    "truthfulqa_true_informative_ppo_ptx_minus_gpt": TRUTHFULQA_MORE,
    "toxic_rate_respectful_ppo_ptx_minus_gpt": TOXICITY_FEWER,
    "toxic_rate_respectful_sft_minus_gpt": SFT_LESS_TOXIC_THAN_GPT,
    "toxic_rate_respectful_ppo_minus_sft": PPO_MORE_TOXIC_THAN_SFT,
    "squad_f1_ppo_minus_gpt": SQUAD_TAX,
    "squad_f1_ppo_ptx_minus_ppo": SQUAD_RECOVERY,
}

# Claims about numbers this study fixes itself, with how: they get no verdict (DESIGN.md, "Statistics").
BY_DESIGN: dict[str, str] = {
    "agreement_train": "the labelers' shared noise is calibrated until training labelers agree at the paper's 72.6%",
    "agreement_heldout": "held-out labelers share the noise scale calibrated on the training labelers' agreement",
}


# --------------------------------------------------------------------------------------------
# How the paper trained: the settings notebooks 02-04 put beside this run's
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperSetting:
    """One training setting as the paper (or, where `where` says so, later reproductions) states it."""

    value: str
    where: str


# stage -> setting -> what the paper used. Values are text: several are ranges or depend on model size.
SETTINGS: dict[str, dict[str, PaperSetting]] = {
    "sft": {
        "epochs": PaperSetting("16", "section 3.5, appendix C.1"),
        "peak learning rate": PaperSetting("9.65e-6 at batch 32 (1.3B, 6B); 5.03e-6 at batch 8 (175B), all weights",
                                           "appendix C.1"),
        "learning-rate schedule": PaperSetting("cosine decay to 10%, no warm-up", "appendix C.1"),
        "Adam betas": PaperSetting("(0.9, 0.95)", "appendix C.1"),
        "residual dropout": PaperSetting("0.2", "appendix C.1"),
        "checkpoint choice": PaperSetting("RM score on a validation set (validation loss overfits after one epoch)",
                                          "section 3.5"),
        "PPO initialisation": PaperSetting("SFT for 2 epochs with 10% pretraining data mixed in", "appendix C.3-C.4"),
    },
    "reward": {
        "model": PaperSetting("one 6B RM for every policy size (175B RMs were unstable)", "section 3.5, appendix C.2"),
        "initialisation": PaperSetting("the SFT model", "section 3.5"),
        "epochs": PaperSetting("1 (more overfits)", "appendix C.2"),
        "learning rate": PaperSetting("9e-6, cosine", "appendix C.2"),
        "batch": PaperSetting("64 prompts, each with all C(K,2) pairs of its ranking", "section 3.5"),
        "K completions ranked": PaperSetting("4 to 9", "section 3.5"),
        "bias": PaperSetting("demonstrations score a mean of 0", "section 3.5"),
    },
    "ppo": {
        "KL beta": PaperSetting("0.02 (fixed)", "appendix C.3-C.4"),
        "discount gamma": PaperSetting("1", "appendix C.3-C.4"),
        "GAE lambda": PaperSetting("0.95 (later reproductions; the paper does not give it)", "reproductions"),
        "clip (policy / value)": PaperSetting("0.2 / 0.2 (the value clip from later reproductions)", "appendix C.3-C.4"),
        "rollout temperature": PaperSetting("1", "appendix C.3-C.4"),
        "episodes per iteration": PaperSetting("512", "appendix C.3-C.4"),
        "minibatch": PaperSetting("64", "appendix C.3-C.4"),
        "PPO epochs per batch": PaperSetting("1 (4 in later reproductions)", "appendix C.3-C.4"),
        "episodes in all": PaperSetting("256k (~31k unique prompts, ~500 iterations)", "appendix C.3-C.4"),
        "learning rate": PaperSetting("constant after a 10-iteration warm-up", "appendix C.3-C.4"),
        "EMA of weights": PaperSetting("decay 0.992", "appendix C.3-C.4"),
        "value initialisation": PaperSetting("the RM", "section 3.5"),
        "PPO-ptx gamma": PaperSetting("27.8, with 8x as many pretraining examples as episodes",
                                      "section 3.5, appendix C.3-C.4"),
        "checkpoint choice": PaperSetting("not stated among the paper's PPO settings", "-"),
    },
}


def settings_beside(stage: str, ours: dict[str, object]) -> list[tuple[str, str, object]]:
    """(setting, the paper's value, this run's value) rows for a notebook table; `ours` maps a setting name of
    SETTINGS[stage] to this run's value, and every name must be one the paper table has (a typo is an error)."""
    paper_settings = SETTINGS[stage]
    unknown = [name for name in ours if name not in paper_settings]
    if unknown:
        raise KeyError(f"Not a paper setting of {stage}: {unknown}. Known: {list(paper_settings)}")
    return [(name, paper_settings[name].value, value) for name, value in ours.items()]
