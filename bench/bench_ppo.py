"""PPO speed and memory: one shared frozen base carrying the four roles as LoRA adapters, vs four models.

    python bench/bench_ppo.py                                   # tiny preset (SmolLM2-135M), 1 iteration each
    python bench/bench_ppo.py --preset micro --iterations 2     # seconds, for a smoke test
    python bench/bench_ppo.py --trl-python /tmp/trl110/bin/python --out bench/results/ppo_bench.md

Designs, each in its own subprocess so that its peak RSS (ru_maxrss) is its own:
  shared     rlhf_lib.ppo as used by train_ppo: one base, adapters policy/reference/value/reward
  separate   the same PPO code, but every role its own copy of the base (policy, reference, value, reward)
  shared@8   the shared design at TRL's side-by-side settings (batch 8, one minibatch, 32 tokens)
  ...+gc     with gradient checkpointing in the update (`model.gradient_checkpointing`): less activation
             memory for recomputed forwards
  ...+mid     with an RM whose head reads the middle block (hidden_states[n/2], the mean over the response:
             `reward.feature_layers`' first depth, `reward.pooling`): the value and reward forwards stop there.
             Not TRL's set-up (its RM and value read the last block); it shows what the study gains when its RM
             picks that depth
  ...+recompute  the rollout's old log-probs from a policy forward over the sampled text, not from the sampler
             (`ppo.logprobs_from_sampler`, on in the tiny preset since 2026-12-05; TRL takes the sampler's)
  (options combine: shared@8+gc+mid)
  TRL        bench_trl_ppo.py (TRL 1.10 trl.experimental.ppo.PPOTrainer, full and LoRA) in its own venv

Both our designs time exactly the iteration body of train_ppo (collect_rollout + ppo_update) without
logging or checkpoints. SFT and RM adapters are random LoRA on the preset's base (speed does not
depend on the values). Numbers from a shared 2-core machine are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse keeper who loves storms.",
    "List three creative uses for a paperclip.",
    "Summarise the plot of a story in which a cat becomes mayor of a small town.",
    "What is the difference between weather and climate?",
    "Rewrite this sentence in the past tense: The children run to the river and swim until dusk.",
    "Give me a recipe idea that uses lentils, lemon and spinach.",
    "Classify the sentiment of this review as positive or negative: The battery died after two days.",
    "Answer briefly: who wrote the novel Pride and Prejudice?",
    "Brainstorm five names for a bakery that only sells bread made with ancient grains.",
    "Describe how a bill becomes a law, in simple words for a ten-year-old.",
    "Translate into plain English: The meeting has been postponed sine die.",
    "Write a polite email declining an invitation to speak at a conference.",
    "Why do onions make people cry when they are cut?",
    "Suggest a weekend plan for someone visiting a rainy coastal city.",
    "Explain what a prime number is and give two examples.",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------
# The two designs
# --------------------------------------------------------------------------------------------


def build_separate(cfg, sft_dir: Path, rm_dir: Path):
    """Four copies of the base, one role each: the layout of most RLHF code (and of TRL's full mode)."""
    import torch
    from torch import nn

    from rlhf_lib import models
    from rlhf_lib.adapters import RM_ADAPTER, RM_HEAD, attach_adapter, freeze_dropout, read_meta
    from rlhf_lib.ppo import PolicyValueRoles

    class SeparateRoles(PolicyValueRoles):
        """PolicyValueRoles whose roles live in separate networks instead of adapters of one."""

        def __init__(self, nets: dict[str, nn.Module], **kwargs):
            super().__init__(nets["policy"], adapters={name: name for name in nets}, **kwargs)
            self.nets = nn.ModuleDict(nets)

        @contextmanager
        def role(self, name: str):
            yield self.nets[name]

    def one(name: str, adapter_dir: Path, trainable: bool) -> nn.Module:
        net = attach_adapter(models.load_from_preset(cfg), adapter_dir, name, trainable=trainable)
        freeze_dropout(net)
        return net.eval()

    nets = {"policy": one("policy", sft_dir, True), "reference": one("reference", sft_dir, False),
            "value": one("value", rm_dir / RM_ADAPTER, True), "reward": one("reward", rm_dir / RM_ADAPTER, False)}
    device = next(nets["policy"].parameters()).device
    value_head = models.ScalarHead.load(rm_dir / RM_HEAD, device=device).float()
    reward_head = models.ScalarHead.load(rm_dir / RM_HEAD, device=device).float()
    roles = SeparateRoles(nets, value_head=value_head, temperature=cfg.generation.temperature, reward_head=reward_head,
                          reward_bias=float(read_meta(rm_dir)["bias"]))
    assert all(p.requires_grad for p in roles.named_trainable().values()) and torch.is_grad_enabled()
    return roles, models.load_tokenizer(cfg.model.name)


def run_design(design: str, preset: str, overrides: dict, artifacts: Path, iterations: int, rm: str = "rm") -> dict:
    """Child process: build the roles, then time `iterations` PPO iterations (rollout + update)."""
    import torch

    from rlhf_lib.config import load_preset
    from rlhf_lib.ppo import build_optimizer, build_roles, collect_rollout, iteration_prompts, ppo_update

    cfg = load_preset(preset, overrides)
    started = time.time()
    if design == "separate":
        roles, tokenizer = build_separate(cfg, artifacts / "sft", artifacts / rm)
    else:
        roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / rm)
    setup_s = time.time() - started
    optimizer = build_optimizer(roles, cfg.ppo)
    rollout_s = update_s = 0.0
    lengths = []
    for iteration in range(1, iterations + 1):
        torch.manual_seed(iteration)
        prompts = iteration_prompts(PROMPTS, iteration, cfg.ppo.rollout_batch, seed=0)
        t0 = time.time()
        rollout = collect_rollout(roles, tokenizer, prompts, cfg, cfg.ppo.kl_beta, seed=iteration)
        t1 = time.time()
        if cfg.model.gradient_checkpointing:
            roles.train()  # as train_ppo does: transformers only checkpoints in train mode (dropout is zero anyway)
        ppo_update(roles, optimizer, rollout, cfg.ppo, cfg.ppo.minibatch, torch.Generator().manual_seed(iteration),
                   micro_batch_size=cfg.generation.batch_size)
        roles.eval()
        t2 = time.time()
        rollout_s, update_s = rollout_s + t1 - t0, update_s + t2 - t1
        lengths.append(rollout.response_mask.sum(1).mean().item())
    episodes = cfg.ppo.rollout_batch * iterations
    return {
        "design": design, "episodes": episodes, "train_s": round(rollout_s + update_s, 2),
        "episodes_per_s": round(episodes / (rollout_s + update_s), 4), "rollout_s": round(rollout_s, 2),
        "update_s": round(update_s, 2), "setup_s": round(setup_s, 2), "peak_rss_mb": round(peak_rss_mb()),
        "mean_response_tokens": round(sum(lengths) / len(lengths), 1), "threads": torch.get_num_threads(),
        "settings": {
            "rollout_batch": cfg.ppo.rollout_batch, "minibatch": cfg.ppo.minibatch, "ppo_epochs": cfg.ppo.ppo_epochs,
            "max_new_tokens": cfg.generation.max_new_tokens, "lora_rank": cfg.model.lora_rank, "model": cfg.model.name,
            "rm_layer": roles.reward_layer, "logprobs_from_sampler": cfg.ppo.logprobs_from_sampler},
    }


# --------------------------------------------------------------------------------------------
# The parent: artifacts, children, report
# --------------------------------------------------------------------------------------------


def make_artifacts(preset: str, root: Path) -> None:
    """Random-valued SFT and RM adapters on the preset's base, in the formats train_ppo reads."""
    import torch

    from rlhf_lib import models
    from rlhf_lib.adapters import save_policy_dir, save_reward_dir
    from rlhf_lib.config import load_preset

    cfg = load_preset(preset)
    for seed, kind in ((1, "sft"), (2, "rm")):
        torch.manual_seed(seed)
        lm = models.lora_from_config(models.load_from_preset(cfg), cfg.model)
        with torch.no_grad():
            for name, param in lm.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.01)
        if kind == "sft":
            save_policy_dir(lm, "default", root / "sft", cfg.model.name)
        else:
            head = models.ScalarHead(models.hidden_size_of(lm))
            save_reward_dir(lm, "default", head, root / "rm", cfg.model.name, bias=0.0)
            save_reward_dir(lm, "default", head, root / "rm_mid", cfg.model.name, bias=0.0, pooling="mean_response",
                            layer=models.block_count(lm) // 2)


def run_child(command: list[str], env: dict) -> dict:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"design": " ".join(command[-6:]), "error": (done.stderr or done.stdout)[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict], command: str, preset: str, started: str, load_before: float) -> str:
    import torch

    lines = [
        "# PPO benchmark: shared-base adapters vs separate models (and TRL 1.10's PPOTrainer)",
        "",
        f"- date: {started} (start); finished {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; 1-minute load average "
        f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after (other jobs may share these cores)",
        f"- preset: {preset}; each row is one process; episodes/s counts rollout + update time only",
        "",
        "| design | episodes | episodes/s | rollout s | update s | setup s | peak RSS MB | settings |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['design']} | failed: {r['error'][-300:]!r} | | | | | | |")
            continue
        settings = r.get("settings", {})
        brief = ", ".join(f"{k}={v}" for k, v in settings.items() if k in (
            "rollout_batch", "minibatch", "ppo_epochs", "max_new_tokens", "lora_rank", "rm_layer", "logprobs_from_sampler"))
        lines.append(f"| {r['design']} | {r['episodes']} | {r['episodes_per_s']} | {r.get('rollout_s', '')} | "
                     f"{r.get('update_s', '')} | {r['setup_s']} | {r['peak_rss_mb']} | {brief or 'batch 8, 32 tokens'} |")
    trl = {r["design"]: r for r in results if r["design"].startswith("TRL") and "error" not in r}
    ours = [r for r in results if not r["design"].startswith("TRL") and "error" not in r and "settings" in r]
    if trl and ours:  # the targets are ratios against TRL, both taken from this one run
        lines += ["", "Against TRL in this run (speed: episodes/s ratio, higher is better; memory: peak RSS ratio, "
                  "lower is better):", "", "| design | " + " | ".join(
                      f"speed vs {name} | memory vs {name}" for name in trl) + " |",
                  "| --- |" + " --- | --- |" * len(trl)]
        for r in ours:
            cells = [f"{r['episodes_per_s'] / t['episodes_per_s']:.2f}x | {r['peak_rss_mb'] / t['peak_rss_mb']:.2f}x"
                     for t in trl.values()]
            lines.append(f"| {r['design']} | " + " | ".join(cells) + " |")
    lines += ["", "Raw results:", "", "```json", json.dumps(results, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--designs", default="shared,separate,shared@8,shared@8+gc", help="comma-separated subset")
    parser.add_argument("--trl-python", help="python of a venv with trl==1.10.0 (runs bench_trl_ppo.py, full and LoRA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every child (0: default)")
    parser.add_argument("--out", help="write the Markdown report here (e.g. bench/results/ppo_bench.md)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: JSON job spec of one design
    args = parser.parse_args()

    if args.child:
        job = json.loads(args.child)
        import torch

        if job["threads"]:
            torch.set_num_threads(job["threads"])
        print(json.dumps(run_design(job["design"], job["preset"], job["overrides"], Path(job["artifacts"]), job["iterations"],
                                    job.get("rm", "rm"))))
        return

    started, load_before = datetime.now(UTC).isoformat(timespec="seconds"), os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    batch8 = {"ppo.rollout_batch": 8, "ppo.minibatch": 8, "ppo.ppo_epochs": 2, "generation.max_new_tokens": 32,
              "generation.batch_size": 8}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp)
        make_artifacts(args.preset, artifacts)
        for design in args.designs.split(","):
            base, *options = design.split("+")
            name, overrides = ("shared", dict(batch8)) if base == "shared@8" else (base, {})
            if "gc" in options:
                overrides["model.gradient_checkpointing"] = True
            if "recompute" in options:
                overrides["ppo.logprobs_from_sampler"] = False
            job = {"design": name, "preset": args.preset, "overrides": overrides, "artifacts": str(artifacts),
                   "iterations": args.iterations, "threads": args.threads, "rm": "rm_mid" if "mid" in options else "rm"}
            result = run_child([sys.executable, __file__, "--child", json.dumps(job)], env)
            result["design"] = design
            results.append(result)
            print(json.dumps(result), flush=True)
        if args.trl_python:
            from rlhf_lib import models

            prompts_file = artifacts / "prompts.json"
            prompts_file.write_text(json.dumps(PROMPTS))
            model_dir = models.materialize(models.REGISTRY["smollm2-135m-instruct"].name)
            for mode in ("full", "lora"):
                command = [args.trl_python, str(REPO / "bench" / "bench_trl_ppo.py"), "--model-dir", str(model_dir),
                           "--mode", mode, "--iterations", str(args.iterations), "--prompts", str(prompts_file),
                           "--threads", str(args.threads)]
                result = run_child(command, {**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.out:
        command = "python bench/bench_ppo.py " + " ".join(sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report(results, command, args.preset, started, load_before))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
