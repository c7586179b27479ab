"""PPO and PPO-ptx for RLHF, as in InstructGPT (Ouyang et al., 2022, appendix C.4): the training loop.

Usage (the notebook 04_ppo does this for PPO and for PPO-ptx)::

    from rlhf_lib.config import load_preset
    from rlhf_lib.ppo import train_ppo
    cfg = load_preset("tiny")
    result = train_ppo(cfg, policy_init_dir=sft_dir, reward_dir=rm_dir, prompts=ppo_prompts,
                       pretrain_texts=prose, out_dir="runs/tiny/ppo-work", ptx=False)
    result.policy_dir        # the trained policy: a peft adapter directory + meta.json
    result.metrics_csv       # one row per iteration (reward, KL, entropy, losses, ...)

Distributed (two CPU processes here; GPUs and nodes the same way)::

    torchrun --nproc_per_node 2 my_script.py   # my_script calls train_ppo; accelerate wraps DDP

One iteration: steps 1-6 in rlhf_lib.ppo.rollout (sample, logprobs, score, per-token rewards, GAE,
whitening; the math in rlhf_lib.ppo.core), steps 7-8 in rlhf_lib.ppo.update (PPO epochs over minibatches,
the ptx term), step 9 here (the KL controller), then metrics, the checkpoint and validation.

What a run writes into out_dir::

    metrics.csv, samples.jsonl, tensorboard/   per iteration: metrics; sample (prompt, response, score)
    checkpoint-000012/                         the last good state: trainable weights, optimizer, EMA, counters
    validation.csv, validation_state.json      greedy validation points; the committed selection state
    best-000010/                               the best allowed validation point's policy so far
    policy/                                    the policy to evaluate (the chosen validation point, else the
                                               last iterate; EMA weights when on), in the SFT adapter format
    policy_last/                               the raw last weights, when policy/ is not them
    value/                                     value adapter + head, in the reward-model format
    result.json; DIVERGED.json                 run summary (chosen iteration and why, collapse guard); which
                                               divergence guard fired, if one did

`rollout_batch` and `minibatch` count episodes over all processes (as the paper's 512 and 64 do).

Guards: a non-finite value, mean KL above `max_kl` or entropy below `min_entropy` raise PPODivergence;
the last good checkpoint stays. The collapse guard (rlhf_lib.ppo.selection) compares each rollout's mean
response length and entropy with the first rollout's and stops the run cleanly or flags the iteration.
Checkpoint choice (`validation_prompts` > 0): greedy answers to held-out PPO prompts, scored as PPO is paid,
every `validation_every` iterations; `select_checkpoint` keeps the best that does not look collapsed.
Checkpoints are written every iteration (atomically) and a rerun with the same `out_dir` resumes from the
last one. Randomness is reseeded from (seed, iteration, rank) at each iteration, so a resumed run
reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_lib.artifacts import read_meta, save_policy_dir
from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_write_text
from rlhf_lib.ppo.checkpoint import (
    TrainState,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    remove_interrupted_writes,
    save_checkpoint,
)
from rlhf_lib.ppo.core import KLController, learning_rate_at
from rlhf_lib.ppo.outputs import RunLog, export_run
from rlhf_lib.ppo.roles import RewardFn, build_roles
from rlhf_lib.ppo.rollout import (
    PretrainSampler,
    collect_rollout,
    distinct_fraction,
    effective_missing_eos_penalty,
    validate_policy,
)
from rlhf_lib.ppo.selection import (
    ValidationTracker,
    collapse_reason,
    split_validation_prompts,
)
from rlhf_lib.ppo.update import EMA, build_optimizer, ppo_update

logger = logging.getLogger(__name__)


class PPODivergence(RuntimeError):
    """Training stopped by a divergence guard; `checkpoint` is the last good state (None before the first)."""

    def __init__(self, reason: str, iteration: int, checkpoint: Path | None):
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"PPO diverged at iteration {iteration}: {reason}; {where}.")
        self.reason, self.iteration, self.checkpoint = reason, iteration, checkpoint


@dataclass
class PPOResult:
    """Where a finished run put its artifacts, and its per-iteration metrics."""

    out_dir: Path
    policy_dir: Path  # the policy to evaluate (EMA weights when ema_decay > 0)
    value_dir: Path  # value adapter + head, in the reward-directory format
    metrics_csv: Path
    samples_jsonl: Path
    tensorboard_dir: Path
    iterations: int  # iterations whose update was taken
    metrics: list[dict[str, float]] = field(default_factory=list)
    chosen_iteration: int | None = None  # the iterate exported as policy_dir (0 = the initial policy)
    selection: str = ""  # why that one
    stop_reason: str | None = None  # the collapse guard's reason when it stopped the run
    validation_csv: Path | None = None  # one row per validation point (None when validation is off)
    missing_eos_penalty: float = float("nan")  # in score units: the knob times the RM's sft_score_std


def iteration_prompts(prompts: Sequence[str], iteration: int, batch: int, seed: int) -> list[str]:
    """The `batch` prompts of iteration i (1-based): consecutive slices of seeded per-epoch permutations."""
    n = len(prompts)
    picks, perms = [], {}
    for k in range((iteration - 1) * batch, iteration * batch):
        epoch, position = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        picks.append(prompts[perms[epoch][position]])
    return picks


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 1_000_003 + iteration * 9_176 + rank * 101) % (2**31)


def _mean(history: list[dict[str, float]], key: str) -> float:
    values = [h[key] for h in history if not math.isnan(h[key])]
    return sum(values) / len(values) if values else float("nan")


# ============================================================================================
# The loop
# ============================================================================================


def train_ppo(
    cfg: StudyConfig,
    policy_init_dir: str | Path | None,
    reward_dir: str | Path | None,
    prompts: list[str],
    pretrain_texts: list[str],
    out_dir: str | Path,
    ptx: bool,
    *,
    reward_fn: RewardFn | None = None,
    accelerator=None,
    progress: bool = True,
    samples_per_iteration: int = 8,
) -> PPOResult:
    """Train a policy with PPO (ptx=False) or PPO-ptx (ptx=True) and return where everything went.

    policy_init_dir: SFT adapter directory (None: start from the base, which is then also the reference).
    reward_dir: RM directory; `reward_fn` overrides its scoring (e.g. a gold labeler), while a same-base
    RM still initialises the value function. Rerunning with the same out_dir resumes from its last
    checkpoint; raising `cfg.ppo.iterations` continues a finished run. The rollout's scoring forwards run in
    chunks of rows of similar length (`cfg.ppo.forward_tokens`), PPO minibatches at most
    `cfg.generation.batch_size` sequences at a time.
    With `[ppo] validation_prompts` > 0 that many of `prompts` are held out from rollouts and the exported
    policy is the validation point chosen by `select_checkpoint` (see validation.csv, result.json).
    The collapse guard (`collapse_fraction`, `collapse_action`) stops or flags a policy whose response
    length or entropy fell below that share of the first rollout's.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    ppo = cfg.ppo
    ptx_coef = ppo.ptx_coef if ptx else 0.0
    if ptx and ptx_coef <= 0:
        raise ValueError("ptx=True needs [ppo] ptx_coef > 0 (the paper's gamma is 27.8); with 0 PPO-ptx would equal PPO.")
    if cfg.generation.temperature <= 0:
        raise ValueError("PPO samples its rollouts: [generation] temperature must be > 0 (the paper uses 1).")
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt.")
    if reward_dir is None and reward_fn is None:
        raise ValueError("Pass reward_dir (a trained RM) or reward_fn.")
    rollout_prompts, validation_prompts = split_validation_prompts(prompts, ppo.validation_prompts, cfg.seed)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if ppo.rollout_batch % world or ppo.minibatch % world:
        raise ValueError(f"rollout_batch ({ppo.rollout_batch}) and minibatch ({ppo.minibatch}) must divide by the {world} processes.")
    local_minibatch = ppo.minibatch // world  # rollout_batch and minibatch are global, as in the paper
    updates_per_iteration = ppo.ppo_epochs * (ppo.rollout_batch // ppo.minibatch)
    reward_meta = read_meta(reward_dir) if reward_dir else None
    eos_penalty = effective_missing_eos_penalty(ppo, reward_meta)
    if main:
        logger.info("PPO missing-EOS penalty: %.4g score units (%.4g x the RM's SFT-sample score std).",
                    eos_penalty, ppo.missing_eos_penalty)

    # Models, optimizer, controllers; then the last checkpoint, if any.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roles, tokenizer, rm_fn, base_name = build_roles(
        cfg, policy_init_dir, reward_dir, device=accelerator.device, need_reward=reward_fn is None
    )
    reward_fn = reward_fn or rm_fn
    optimizer = build_optimizer(roles, ppo)
    ema = EMA(roles.named_policy_parameters(), ppo.ema_decay) if ppo.ema_decay > 0 else None
    kl_ctl = KLController(ppo.kl_beta, ppo.adaptive_kl, ppo.target_kl, horizon=ppo.kl_horizon)
    state = TrainState(kl_beta=kl_ctl.value)
    if main:
        remove_interrupted_writes(out_dir)  # else a kill -9 inside a write leaves a folder that gets published
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        check_resumable(checkpoint, ppo)
        state = load_checkpoint(checkpoint, roles, optimizer, ema)
        kl_ctl.value = state.kl_beta
    model, optimizer = accelerator.prepare(roles, optimizer)  # DDP around the trainable forward when distributed
    ptx_sampler = None
    if ptx_coef > 0:
        ptx_sampler = PretrainSampler(pretrain_texts, tokenizer, ppo.ptx_batch, cfg.sft.max_seq_tokens, accelerator.device)

    log = RunLog(out_dir, state.iteration, enabled=main, cfg=cfg)
    # The main process trims the validation files of an interrupted run before the others read them.
    tracker = ValidationTracker(out_dir, ppo.collapse_fraction, bool(validation_prompts), writer=True) if main else None
    accelerator.wait_for_everyone()
    tracker = tracker or ValidationTracker(out_dir, ppo.collapse_fraction, bool(validation_prompts), writer=False)
    run_info = {"seed": cfg.seed, "base_model": base_name, "ptx": ptx, "world_size": world, "ppo": asdict(ppo),
                "missing_eos_penalty_score_units": eos_penalty,
                "sft_score_std": (reward_meta or {}).get("sft_score_std"),
                "validation_prompt_list": validation_prompts}
    policy_meta = {"method": "ppo-ptx" if ptx else "ppo", "ema_decay": ppo.ema_decay, "finetune": "lora",
                   "quantize_4bit": cfg.model.quantize_4bit}

    def validate(iteration: int) -> None:
        # Every process generates (sharded engines need all ranks in each forward); the main one records.
        with ema.applied() if ema is not None else contextlib.nullcontext():
            try:
                stats = validate_policy(roles, tokenizer, validation_prompts, cfg, reward_fn, eos_penalty)
            except FloatingPointError as err:
                raise PPODivergence(f"validation: {err}", iteration, latest_checkpoint(out_dir)) from err
            tracker.record(iteration, stats, lambda d: save_policy_dir(
                roles.model, "policy", d, base_name, **policy_meta, iteration=iteration, validation_score=stats["score"]))
        accelerator.wait_for_everyone()

    if tracker.due(state.iteration, ppo.validation_every, ppo.iterations):
        validate(state.iteration)  # iteration 0 (the initial policy), or a point whose validation was interrupted
    stop_reason = None
    bar = tqdm(range(state.iteration + 1, ppo.iterations + 1), initial=state.iteration, total=ppo.iterations,
               desc="PPO-ptx" if ptx else "PPO", unit="it", disable=not (progress and main))
    try:
        for iteration in bar:
            started = time.time()
            seed = _iteration_seed(cfg.seed, iteration, rank)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            batch_prompts = iteration_prompts(rollout_prompts, iteration, ppo.rollout_batch, cfg.seed)[rank::world]
            try:
                # Steps 1-6.
                rollout = collect_rollout(roles, tokenizer, batch_prompts, cfg, kl_ctl.value, reward_fn, seed=seed,
                                          missing_eos_penalty=eos_penalty)
                stats = rollout.stats()
                # Divergence and collapse guards read means over all ranks, so every rank stops together.
                kl, entropy, length = accelerator.reduce(torch.tensor(
                    [stats["kl"], stats["entropy"], stats["response_length"]], device=accelerator.device), "mean").tolist()
                if kl > ppo.max_kl:
                    raise FloatingPointError(f"mean sequence KL {kl:.3f} > max_kl {ppo.max_kl}")
                if entropy < ppo.min_entropy:
                    raise FloatingPointError(f"mean token entropy {entropy:.4f} < min_entropy {ppo.min_entropy}")
                now = {"response_length": length, "entropy": entropy}
                start_stats = state.start_stats or now  # the first rollout, before any update
                collapse = collapse_reason(start_stats, now, ppo.collapse_fraction)
                steps: list[dict[str, float]] = []
                if collapse and ppo.collapse_action == "stop":
                    # A collapsed policy is not updated further; the last checkpoint stays the last iterate.
                    stop_reason = f"collapse guard at iteration {iteration}: {collapse}"
                else:
                    # Steps 7-8.
                    if cfg.model.gradient_checkpointing:
                        roles.train()  # HF only checkpoints in train mode; dropout is already zero everywhere
                    steps = ppo_update(
                        model, optimizer, rollout, ppo, local_minibatch, generator, accelerator=accelerator,
                        micro_batch_size=cfg.generation.batch_size, ptx_coef=ptx_coef, ptx_sampler=ptx_sampler,
                        lr_schedule=lambda step, role: learning_rate_at(step, ppo, updates_per_iteration, role),
                        first_step=state.optimizer_steps, ema=ema, update_policy=iteration > ppo.value_warmup_iterations,
                    )
                    roles.eval()
            except FloatingPointError as err:
                if main:
                    atomic_write_text(out_dir / "DIVERGED.json",
                                      json.dumps({"iteration": iteration, "reason": str(err)}, indent=1))
                raise PPODivergence(str(err), iteration, latest_checkpoint(out_dir)) from err

            # Step 9: the KL controller; then metrics (averaged over ranks), logs and the checkpoint.
            row = {**stats, **{k: _mean(steps, k) for k in (
                "policy_loss", "value_loss", "ptx_loss", "loss", "approx_kl", "clip_frac", "value_clip_frac",
                "grad_norm", "value_grad_norm", "train_entropy", "ratio_mean")}}
            keys = sorted(row)
            means = accelerator.reduce(torch.tensor([row[k] for k in keys], device=accelerator.device, dtype=torch.float64), "mean")
            row = dict(zip(keys, means.tolist(), strict=True))
            if world > 1:  # distinct over the whole batch, not a mean of per-process shares
                from accelerate.utils import gather_object

                row["distinct_fraction"] = distinct_fraction(gather_object(list(rollout.responses)))
            elapsed = time.time() - started
            row.update(iteration=iteration, episodes=iteration * ppo.rollout_batch, time_s=elapsed,
                       episodes_per_s=ppo.rollout_batch / elapsed, lr=steps[-1]["lr"] if steps else float("nan"),
                       kl_beta=kl_ctl.value, collapsed=collapse is not None)
            if stop_reason is not None:
                log.write(row, rollout, samples_per_iteration)  # the collapsed rollout is kept for inspection
                warnings.warn(f"PPO stopped by the {stop_reason}; the policy after iteration {state.iteration} is the "
                              "last iterate.", stacklevel=2)
                break
            kl_ctl.update(row["kl"], ppo.rollout_batch)
            row["kl_beta"] = kl_ctl.value
            state = TrainState(iteration=iteration, optimizer_steps=state.optimizer_steps + len(steps), kl_beta=kl_ctl.value,
                               start_stats=start_stats)
            log.write(row, rollout, samples_per_iteration)
            if main:
                save_checkpoint(out_dir, roles, optimizer, state, ema, run_info)
                bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}")
            accelerator.wait_for_everyone()
            if tracker.due(iteration, ppo.validation_every, ppo.iterations):
                validate(iteration)
    finally:
        bar.close()
        log.close()

    if validation_prompts:
        chosen, selection = tracker.selection()
        chosen_dir = tracker.best_dir if chosen is not None and chosen == tracker.best_iteration else None
        if chosen_dir is None:
            chosen = state.iteration
            selection = f"{selection}; the last iterate (iteration {state.iteration}) is exported"
    else:
        chosen, chosen_dir = state.iteration, None
        selection = "validation off ([ppo] validation_prompts = 0): the last iterate is exported"
    policy_dir, value_dir = out_dir / "policy", out_dir / "value"
    if main:
        meta = {**policy_meta, "iterations": state.iteration, "chosen_iteration": chosen, "selection": selection}
        export_run(roles, ema, out_dir, base_name, meta, chosen_dir=chosen_dir)
        collapsed = [int(r["iteration"]) for r in log.rows() if r.get("collapsed", 0.0) > 0]
        atomic_write_text(out_dir / "result.json", json.dumps({
            **run_info, "iterations_done": state.iteration, "chosen_iteration": chosen, "selection": selection,
            "stop_reason": stop_reason, "collapsed_iterations": collapsed,
        }, indent=1))
    accelerator.wait_for_everyone()
    return PPOResult(out_dir=out_dir, policy_dir=policy_dir, value_dir=value_dir, metrics_csv=log.metrics,
                     samples_jsonl=log.samples, tensorboard_dir=log.tensorboard, iterations=state.iteration,
                     metrics=log.rows(), chosen_iteration=chosen, selection=selection, stop_reason=stop_reason,
                     validation_csv=tracker.csv if validation_prompts else None, missing_eos_penalty=eos_penalty)
