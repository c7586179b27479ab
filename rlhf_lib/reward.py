"""Step 2 of InstructGPT: a reward model trained on K-wise rankings.

The RM is a transformer (LoRA on the base, or full) with a scalar head read at the final (EOS) token.
Loss (Ouyang et al. 2022, eq. 1): all C(K,2) pairs of one prompt's ranking form ONE batch element,

    loss(prompt) = -1/C(K,2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))      (ties dropped)

so each completion is forwarded once per prompt, and pairs of one prompt are never split across
batches (the paper found shuffled pairs overfit). `mode="pairwise"` trains on shuffled independent
pairs instead, on the same data: the ablation. After training, a bias is set so that human-written
demonstrations score a mean of 0. The RM scores TEXT: it re-tokenises with its own tokenizer, so
one RM can judge policies of other families and sizes.

    from rlhf_lib.reward import train_reward_model, RewardModel
    result = train_reward_model(cfg, comparisons, out_dir, demonstrations=demos)
    rm = RewardModel.load(result.model_dir)
    rm.score_texts(["Name a colour."], ["Red."])         # tensor([...]), demos average 0
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhf_lib import models
from rlhf_lib.config import StudyConfig
from rlhf_lib.prompting import format_prompt

META = "meta.json"
HEAD = "head.safetensors"


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def ranked_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs of one ranking; rank 0 is best; equal ranks (ties) give no pair."""
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i, j in itertools.combinations(range(len(ranks)), 2)
        if ranks[i] != ranks[j]
    ]


def kwise_loss(scores: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """-1/#pairs * sum log sigmoid(r_w - r_l) over every untied pair of one prompt's K completions."""
    pairs = ranked_pairs(ranks)
    if not pairs:
        return scores.sum() * 0.0  # all tied: no signal, but keep the graph valid
    winners = torch.tensor([w for w, _ in pairs], device=scores.device)
    losers = torch.tensor([lo for _, lo in pairs], device=scores.device)
    return -F.logsigmoid(scores[winners] - scores[losers]).mean()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class RewardModel:
    """A causal LM body + scalar head that scores (prompt, response) text; frozen after training."""

    model: torch.nn.Module
    head: models.ScalarHead
    tokenizer: object
    base_name: str
    bias: float = 0.0
    max_tokens: int = 320

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids of prompt + response + EOS in the RM's own format, left-padded."""
        texts = [
            format_prompt(self.tokenizer, p) + r.strip() + (self.tokenizer.eos_token or "")
            for p, r in zip(prompts, responses, strict=True)
        ]
        self.tokenizer.padding_side = "left"
        # Truncate from the left so the final (EOS) token, where the score is read, always survives.
        self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens, add_special_tokens=False
        )
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Head output at the last token, before the normalisation bias (differentiable)."""
        batch = self.encode(prompts, responses)
        per_position = models.scalar_outputs(self.model, self.head, batch["input_ids"], batch["attention_mask"])
        last = models.last_token_index(batch["attention_mask"])
        return per_position[torch.arange(len(last), device=last.device), last]

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """Normalised reward of each (prompt, response): demonstrations average 0."""
        if not prompts:
            return torch.empty(0)
        was_training = self.model.training
        self.model.eval()
        # Batches of similar length pad little (a few long HHH dialogues would otherwise pad whole batches).
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        out = [
            self.raw_scores([prompts[j] for j in chunk], [responses[j] for j in chunk]).float().cpu()
            for chunk in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
        ]
        self.model.train(was_training)
        scores = torch.empty(len(prompts))
        scores[torch.tensor(order)] = torch.cat(out)
        return scores - self.bias

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(directory / "adapter")
            finetune = "lora"
        else:
            self.model.save_pretrained(directory / "full", safe_serialization=True)
            self.tokenizer.save_pretrained(directory / "full")
            finetune = "full"
        self.head.save(directory / HEAD)
        meta = {"base_model": self.base_name, "bias": self.bias, "finetune": finetune, "max_tokens": self.max_tokens}
        (directory / META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path | str, device: str = "auto", quantize_4bit: bool = False) -> RewardModel:
        from peft import PeftModel

        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        tokenizer = models.load_tokenizer(meta["base_model"])
        if meta["finetune"] == "lora":
            base = models.load_causal_lm(meta["base_model"], device=device, quantize_4bit=quantize_4bit)
            model = PeftModel.from_pretrained(base, str(directory / "adapter"), adapter_name="reward")
        else:
            model = models.load_causal_lm(str(directory / "full"), device=device)
        model.requires_grad_(False)
        model.eval()
        head = models.ScalarHead.load(directory / HEAD, device=next(model.parameters()).device)
        head.requires_grad_(False)
        return cls(model, head, tokenizer, meta["base_model"], meta["bias"], meta.get("max_tokens", 320))


def new_reward_model(cfg: StudyConfig) -> RewardModel:
    """An untrained RM on the preset's RM base (LoRA + fresh head, or full), dropout off."""
    name = cfg.model.reward_model_name or cfg.model.name
    body = models.load_causal_lm(name, device=cfg.model.device, dtype=cfg.model.dtype, quantize_4bit=cfg.model.quantize_4bit)
    if cfg.model.finetune == "lora":
        body = models.lora_from_config(body, cfg.model)  # "default": saved straight into adapter/
    device = next(body.parameters()).device
    torch.manual_seed(cfg.seed)
    head = models.ScalarHead(models.hidden_size_of(body)).to(device)
    return RewardModel(body, head, models.load_tokenizer(name), name, 0.0, cfg.reward.max_seq_tokens)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class RewardTrainResult:
    model_dir: Path
    history: pd.DataFrame  # step, loss, lr, pairs
    bias: float
    seconds: float


def _cosine_lr(step: int, total: int, min_ratio: float = 0.1) -> float:
    progress = step / max(1, total)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _training_units(comparisons: Sequence[dict], mode: str) -> list[tuple[str, list[str], list[int]]]:
    """One unit per prompt (kwise: all its completions and ranks) or per pair (pairwise ablation)."""
    units = []
    for row in comparisons:
        if mode == "kwise":
            units.append((row["prompt"], list(row["completions"]), list(row["ranks"])))
        else:
            for w, lo in ranked_pairs(row["ranks"]):
                units.append((row["prompt"], [row["completions"][w], row["completions"][lo]], [0, 1]))
    return units


def train_reward_model(
    cfg: StudyConfig,
    comparisons: Sequence[dict],
    out_dir: Path,
    demonstrations: Sequence[tuple[str, str]] = (),
    mode: str = "kwise",
    progress: bool = True,
) -> RewardTrainResult:
    """Train an RM on ranked comparisons (COMPARISON_FEATURES rows); save it with its demo bias.

    kwise: a batch holds `reward.batch_prompts` prompts, each with all of its pairs (the paper).
    pairwise: a batch holds `batch_prompts * mean C(K,2)` shuffled pairs (same pairs per batch on average).
    """
    if mode not in ("kwise", "pairwise"):
        raise ValueError(f"mode must be 'kwise' or 'pairwise', not {mode!r}")
    out_dir = Path(out_dir)
    rm = new_reward_model(cfg)
    units = _training_units(comparisons, mode)
    if not units:
        raise ValueError("No comparisons to train on (every ranking tied?).")
    batch_size = cfg.reward.batch_prompts
    if mode == "pairwise":
        mean_pairs = np.mean([len(ranked_pairs(r["ranks"])) for r in comparisons])
        batch_size = max(1, round(cfg.reward.batch_prompts * mean_pairs))
    steps_per_epoch = math.ceil(len(units) / batch_size)
    total_steps = steps_per_epoch * cfg.reward.epochs
    params = [p for p in rm.model.parameters() if p.requires_grad] + list(rm.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.reward.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, total_steps))
    rng = random.Random(cfg.seed)
    history = []
    started = time.time()
    rm.model.train()
    bar = tqdm(total=total_steps, desc=f"reward model ({mode})", disable=not progress)
    step = 0
    for _epoch in range(cfg.reward.epochs):
        order = list(range(len(units)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [units[i] for i in order[start : start + batch_size]]
            optimizer.zero_grad(set_to_none=True)
            # The batch's loss is a mean over its units; each forward holds at most `forward_batch`
            # sequences and is backpropagated at once, so memory is bounded and the gradient unchanged.
            loss_value, n_pairs = 0.0, 0
            if mode == "kwise":
                for prompt, completions, ranks in batch:
                    scores = torch.cat([
                        rm.raw_scores([prompt] * len(chunk), chunk)
                        for chunk in _chunks(completions, cfg.reward.forward_batch)
                    ])
                    loss = kwise_loss(scores, ranks) / len(batch)
                    loss.backward()
                    loss_value += loss.item()
                    n_pairs += len(ranked_pairs(ranks))
            else:
                for chunk in _chunks(batch, max(1, cfg.reward.forward_batch // 2)):
                    prompts = [p for p, c, _ in chunk for _ in c]
                    scores = rm.raw_scores(prompts, [text for _, c, _ in chunk for text in c]).view(-1, 2)
                    loss = -F.logsigmoid(scores[:, 0] - scores[:, 1]).sum() / len(batch)
                    loss.backward()
                    loss_value += loss.item()
                n_pairs = len(batch)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "pairs": n_pairs})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    rm.model.eval()
    if demonstrations:
        prompts, responses = zip(*demonstrations, strict=True)
        rm.bias = 0.0
        rm.bias = float(rm.score_texts(list(prompts), list(responses)).mean())
    rm.model.requires_grad_(False)
    model_dir = out_dir / ("model" if mode == "kwise" else "model_pairwise")
    rm.save(model_dir)
    frame = pd.DataFrame(history)
    frame.to_csv(out_dir / f"train_history_{mode}.csv", index=False)
    return RewardTrainResult(model_dir, frame, rm.bias, time.time() - started)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def comparison_predictions(rm: RewardModel, comparisons: Sequence[dict], set_name: str) -> pd.DataFrame:
    """One row per untied pair: both scores and which one the labeler preferred (saved for recomputation)."""
    rows = []
    for row in comparisons:
        scores = rm.score_texts([row["prompt"]] * len(row["completions"]), list(row["completions"])).tolist()
        for w, lo in ranked_pairs(row["ranks"]):
            rows.append(
                {
                    "set": set_name,
                    "prompt_id": row["prompt_id"],
                    "labeler_id": row["labeler_id"],
                    "score_chosen": scores[w],
                    "score_rejected": scores[lo],
                }
            )
    return pd.DataFrame(rows)


def preference_pair_predictions(rm: RewardModel, pairs: Sequence[dict], set_name: str = "hhh") -> pd.DataFrame:
    """RM scores on human preference pairs (PREFERENCE_PAIR_FEATURES rows)."""
    prompts = [p["prompt"] for p in pairs]
    chosen = rm.score_texts(prompts, [p["chosen"] for p in pairs]).tolist()
    rejected = rm.score_texts(prompts, [p["rejected"] for p in pairs]).tolist()
    return pd.DataFrame(
        {
            "set": [f"{set_name}/{p['subset']}" for p in pairs],
            "prompt_id": [p["id"] for p in pairs],
            "labeler_id": "human",
            "score_chosen": chosen,
            "score_rejected": rejected,
        }
    )


def pairwise_accuracy(predictions: pd.DataFrame) -> float:
    """Share of pairs where the preferred completion scores higher (a tie counts half)."""
    diff = predictions["score_chosen"] - predictions["score_rejected"]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def calibration_table(predictions: pd.DataFrame, bins: int = 8) -> pd.DataFrame:
    """Predicted P(chosen > rejected) = sigmoid(score difference) vs how often it really was, by bin."""
    diff = (predictions["score_chosen"] - predictions["score_rejected"]).to_numpy()
    # Each pair appears once with its sign chosen at random so both halves of the curve are populated.
    rng = np.random.default_rng(0)
    flip = rng.random(len(diff)) < 0.5
    signed = np.where(flip, -diff, diff)
    outcome = np.where(flip, 0.0, 1.0)
    predicted = 1 / (1 + np.exp(-signed))
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(predicted, edges) - 1, 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "predicted": predicted, "observed": outcome})
    table = frame.groupby("bin").agg(predicted=("predicted", "mean"), observed=("observed", "mean"), n=("observed", "size"))
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The stage (notebook 03 and run_all)
# --------------------------------------------------------------------------------------------


def run_reward_stage(cfg: StudyConfig, paths, progress: bool = True) -> Path:
    """Collect K-wise comparisons, calibrate the labelers, train the RM (and the pairwise ablation),
    and save every prediction needed to recompute its accuracies. Cached per fingerprint.

    An interrupted run keeps its sampled completions and labels in runs/<preset>/work-reward-<fp>/.
    """
    from rlhf_lib import labelers as lab
    from rlhf_lib.comparisons import sample_k_completions
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.pipeline import cached_stage

    data = StudyData.load(paths.require("data") / "study")
    sft_dir = paths.require("sft")
    work = paths.root / f"work-reward-{cfg.fingerprint('reward')}"
    with cached_stage(paths, "reward") as stage:
        if not stage.done:
            rows = [dict(r) for r in data.split("rm")]
            completions, sources = sample_k_completions(cfg, sft_dir / "policy", rows, work / "completions.json", progress)

            # Labelers: calibrate the shared noise on these real samples, then measure agreement.
            train_pop = lab.make_population(cfg.labelers, "train", seed=cfg.seed)
            heldout_pop = lab.make_population(cfg.labelers, "heldout", seed=cfg.seed)
            sigma, _ = lab.calibrate_noise(train_pop, rows, completions, target=cfg.labelers.target_agreement, seed=cfg.seed)
            train_pop, heldout_pop = lab.with_noise(train_pop, sigma), lab.with_noise(heldout_pop, sigma)
            report = lab.agreement(train_pop + heldout_pop, rows, completions, seed=cfg.seed + 1)
            agreement_rows = pd.DataFrame(report.to_rows()).assign(noise_scale=sigma)
            agreement_rows.to_csv(stage.dir / "agreement.csv", index=False)

            # Held-out prompts: never trained on; ranked by training AND by held-out labelers.
            order = list(range(len(rows)))
            random.Random(cfg.seed).shuffle(order)
            n_held = max(1, round(len(rows) * cfg.reward.heldout_fraction))
            held, trained = sorted(order[:n_held]), sorted(order[n_held:])

            def label(indices, population, name):
                return list(
                    lab.label_comparisons(
                        [rows[i] for i in indices], [completions[i] for i in indices], [sources[i] for i in indices],
                        population, seed=cfg.seed, out_path=work / f"{name}.jsonl", progress=progress,
                    )
                )

            train_cmp = label(trained, train_pop, "train_prompts_train_labelers")
            held_by_train = label(held, train_pop, "heldout_prompts_train_labelers")
            held_by_heldout = label(held, heldout_pop, "heldout_prompts_heldout_labelers")
            for name, table in (("comparisons_train.jsonl", train_cmp), ("comparisons_heldout_trainlabelers.jsonl", held_by_train),
                                ("comparisons_heldout_heldoutlabelers.jsonl", held_by_heldout)):
                pd.DataFrame(table).to_json(stage.dir / name, orient="records", lines=True)

            demos = [(r["prompt"], r["reference"]) for r in data.split("sft")]
            results = {}
            for mode in ("kwise", "pairwise"):
                results[mode] = train_reward_model(cfg, train_cmp, stage.dir, demonstrations=demos, mode=mode, progress=progress)

            predictions = []
            hhh = list(data.hhh_pairs)
            for mode, result in results.items():
                rm = RewardModel.load(result.model_dir)
                parts = [
                    comparison_predictions(rm, train_cmp, "train prompts / training labelers"),
                    comparison_predictions(rm, held_by_train, "held-out prompts / training labelers"),
                    comparison_predictions(rm, held_by_heldout, "held-out prompts / held-out labelers"),
                    preference_pair_predictions(rm, hhh, "HHH human pairs"),
                ]
                predictions.append(pd.concat(parts, ignore_index=True).assign(mode=mode))
                del rm
            pd.concat(predictions, ignore_index=True).to_csv(stage.dir / "predictions.csv", index=False)
            (stage.dir / "timing.json").write_text(
                json.dumps({mode: r.seconds for mode, r in results.items()} | {"bias": results["kwise"].bias}, indent=1)
            )
    shutil.rmtree(work, ignore_errors=True)  # the samples and labels are in the published stage now
    return paths.stage("reward")


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with bootstrap 95% intervals per (mode, set), from saved predictions."""
    from rlhf_lib.evaluation.generalization import rm_accuracy_table

    return rm_accuracy_table(predictions, by=("mode", "set"))
