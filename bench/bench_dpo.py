"""DPO training speed: the study's loop (rlhf_lib.dpo) against TRL's DPOTrainer, on the same pairs, side by side.

    python bench/bench_dpo.py                                  # tiny preset (SmolLM2-135M), ~5 minutes
    python bench/bench_dpo.py --preset micro --pairs 8         # seconds, a smoke test
    python bench/bench_dpo.py --out bench/results/dpo_bench.md

Until 2026-12-06 the analysis stage trained DPO with TRL 1.16's DPOTrainer (13.1 of the tiny study's minutes on
2026-12-04). On a CPU that trainer projects every position through the LM head, the prompt's included, and computes
full-vocabulary metrics beside the log-probabilities. Designs, one epoch over the same `--pairs` pairs in batches of
`evaluation.dpo_batch_size`, interleaved over `--repeats` rounds (median):

  trl    TRL's DPOTrainer with the settings the study gave it (constant learning rate, the preset's beta and batch,
         sequences cut at reward.max_seq_tokens, fp32, dropout off); its reference log-probs come from the frozen
         "ref" copy of the SFT adapter at every step
  ours   rlhf_lib.dpo.train_dpo: reference log-probs once up front (the adapter merged), the LM head at the
         completion tokens only, and batches of similar lengths (`length_grouped_batches`; TRL draws them at random)

Both times cover the whole call (model load included) and the training loop alone (ours: the reference pass
included). The SFT adapter is random LoRA of the preset's rank on the preset's base, the pairs are the bench
prompts of bench_generation.py (those within data.max_prompt_tokens) with answers of one to three sentences;
speed does not depend on the values. Both designs start at the loss log 2 (policy = reference), which the table
shows as a check that they train the same objective.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import bench_parser, publish, run_header, trained_looking_lora  # noqa: E402
from bench_generation import bench_prompts  # noqa: E402

SENTENCES = ["Light scatters off the air, and blue light scatters most.", "The keeper loved the storms.",
             "A hook, a pin and a clip will all do.", "Weather is today; climate is decades of it.",
             "Paris is the capital.", "No, thank you, I cannot attend this year.",
             "Start with the smallest step and check it works before the next one."]


def bench_pairs(tokenizer, n: int, max_prompt_tokens: int) -> list[dict[str, str]]:
    """n (prompt, chosen, rejected) rows: bench prompts that fit the preset's prompt cap, answers of 1-3 sentences."""
    from rlhf_lib.prompting import format_prompt

    fitting = [p for p in bench_prompts(4 * n)
               if len(tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) <= max_prompt_tokens]
    answer = lambda i, k: " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(k))  # noqa: E731
    return [{"prompt": prompt, "chosen": answer(i, 1 + i % 3), "rejected": answer(i + 3, 1 + (i + 1) % 3)}
            for i, prompt in enumerate(fitting[:n])]


def trl_dpo(cfg, sft_dir: Path, pairs: list[dict[str, str]], out_dir: Path) -> tuple[float, float]:
    """(first-step loss, training seconds) of one epoch of TRL's DPOTrainer as the study configured it."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf_lib.artifacts import load_policy
    from rlhf_lib.prompting import bos_prefix, format_prompt
    from rlhf_lib.sft import trl_common_args

    model, tokenizer = load_policy(sft_dir, trainable=True)
    bos = bos_prefix(tokenizer)  # TRL adds the tokenizer's BOS itself
    dataset = Dataset.from_list([{"prompt": format_prompt(tokenizer, p["prompt"]).removeprefix(bos),
                                  "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
    ev = cfg.evaluation
    args = DPOConfig(output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=ev.dpo_batch_size,
                     learning_rate=ev.dpo_learning_rate, lr_scheduler_type="constant", beta=ev.dpo_beta,
                     max_length=cfg.reward.max_seq_tokens, save_strategy="no",
                     **trl_common_args(cfg, progress=False, part="dpo"))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    first = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    return float(first), float(result.metrics["train_runtime"])


def our_dpo(cfg, sft_dir: Path, pairs: list[dict[str, str]], out_dir: Path) -> tuple[float, float]:
    """(first-step loss, training seconds) of one epoch of rlhf_lib.dpo.train_dpo."""
    from rlhf_lib.dpo import train_dpo

    result = train_dpo(cfg, sft_dir, pairs, out_dir, progress=False)
    return float(result.log_history["loss"].iloc[0]), result.seconds


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, repeats=2)
    parser.add_argument("--pairs", type=int, default=32, help="pairs of the epoch each design trains")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rlhf_lib import models
    from rlhf_lib.artifacts import save_policy_dir
    from rlhf_lib.config import load_preset
    from rlhf_lib.dpo import tokenize_pairs

    cfg = load_preset(args.preset, {"tracking.report_to": "none"})
    tokenizer = models.load_tokenizer(cfg.model.name)
    pairs = bench_pairs(tokenizer, args.pairs, cfg.data.max_prompt_tokens)
    tokenized = tokenize_pairs(tokenizer, pairs, cfg.reward.max_seq_tokens)
    tokens_per_row = sum(len(p) + (len(c) + len(r)) / 2 for p, c, r in tokenized) / len(tokenized)
    designs = {"trl": trl_dpo, "ours": our_dpo}
    load_before = os.getloadavg()[0]
    calls: dict[str, list[float]] = {name: [] for name in designs}
    loops: dict[str, list[float]] = {name: [] for name in designs}
    first_loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        sft_dir = save_policy_dir(trained_looking_lora(cfg), "default", Path(scratch) / "sft", cfg.model.name)
        for round_index in range(args.repeats):
            for name, design in designs.items():
                started = time.perf_counter()
                first_loss[name], loop_s = design(cfg, sft_dir, pairs, Path(scratch) / f"{name}-{round_index}")
                calls[name].append(time.perf_counter() - started)
                loops[name].append(loop_s)
                print(f"round {round_index + 1} {name}: call {calls[name][-1]:.1f} s, loop {loop_s:.1f} s, "
                      f"first loss {first_loss[name]:.4f}", flush=True)

    steps = -(-len(pairs) // cfg.evaluation.dpo_batch_size)
    lines = [
        f"# DPO training speed, preset `{args.preset}` ({cfg.model.name}, fp32, CPU)",
        "",
        *run_header("bench/bench_dpo.py", argv, args.threads, load_before),
        f"- One epoch of {len(pairs)} pairs, {steps} steps of {cfg.evaluation.dpo_batch_size} pairs; "
        f"{tokens_per_row:.0f} tokens per sequence on average (prompt + completion); LoRA rank {cfg.model.lora_rank}; "
        f"median of {args.repeats} interleaved rounds",
        "",
        "| design | whole call s | training loop s | s per step | first-step loss | loop speed-up vs trl |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    trl_loop = statistics.median(loops["trl"])
    for name in designs:
        loop = statistics.median(loops[name])
        lines.append(f"| {name} | {statistics.median(calls[name]):.1f} | {loop:.1f} | {loop / steps:.2f} | "
                     f"{first_loss[name]:.4f} | {trl_loop / loop:.2f}x |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
