"""Sampling speed: the study's sampler (rlhf_lib.generation.sample_texts) against plain `model.generate`.

    python bench/bench_generation.py                                   # tiny preset (SmolLM2-135M), ~4 minutes
    python bench/bench_generation.py --preset micro --prompts 8        # seconds, a smoke test
    python bench/bench_generation.py --out bench/results/generation_bench.md

Every design samples the same prompts (a mix of short instructions and instructions after a passage of
0-180 words, like the study's closed-domain prompts) from the preset's base with a random LoRA adapter of the
preset's rank (speed does not depend on the adapter's values), temperature 1, `generation.max_new_tokens` new
tokens. Designs, measured in one process, interleaved over `--repeats` rounds (the median is reported):

  plain@8     the old path: peft model as trained (LoRA unmerged), prompts in the order given, 8 per batch
  plain@B     the same at the preset's generation.batch_size B
  merged@B    LoRA merged into a copy of the weights, prompts in order
  fast@B      sample_texts' default: merged, prompts batched by token length (what every stage now uses)
  fast@2B     the same with twice the batch

Prefill and decode are timed apart: prefill = the same call with one new token; decode = the rest. The
arithmetic bound is 2 x parameters x tokens processed (real prompt tokens + sampled tokens, padding excluded)
at the fp32 matmul rate measured in the same run; "% of bound" is that bound's time over the measured time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import matmul_gflops, publish, run_header  # noqa: E402
from bench_ppo import PROMPTS  # noqa: E402

PASSAGE = (
    "The harbour town grew around a fish market that opened before dawn every day of the year. Traders came "
    "from the hill villages with cheese, wool and honey, and left with salted cod and news from the coast. "
    "When the railway arrived the market moved inland, the old quay became a promenade, and the fishermen "
    "who stayed began taking visitors out to the lighthouse on calm summer evenings. "
).split()


def bench_prompts(n: int) -> list[str]:
    """n instructions, every other one after a passage of 0-180 words (the length mix of the study's prompts)."""
    prompts = []
    for i in range(n):
        words = (i * 37) % 181 if i % 2 else 0
        passage = " ".join((PASSAGE * 4)[:words])
        prompts.append(f"{passage}\n\n{PROMPTS[i % len(PROMPTS)]}" if passage else PROMPTS[i % len(PROMPTS)])
    return prompts


def run_design(policy, tokenizer, texts: list[str], batch_size: int, fast: bool, merged: bool, max_new_tokens: int,
               seed: int) -> dict[str, float]:
    """Seconds to sample every prompt (and with one new token: the prefill), and the tokens processed."""
    from rlhf_lib.generation import generate, length_sorted_batches, merged_copy

    def sample(new_tokens: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        model = merged_copy(policy) if merged else policy  # the merge is part of the cost, once per call
        if fast:
            batches = length_sorted_batches(tokenizer, texts, batch_size)
        else:
            batches = [list(range(s, min(s + batch_size, len(texts)))) for s in range(0, len(texts), batch_size)]
        prompt_tokens = sampled = 0
        for index, rows in enumerate(batches):
            out = generate(model, tokenizer, [texts[i] for i in rows], max_new_tokens=new_tokens, temperature=1.0,
                           generator_seed=seed + index)
            prompt_tokens += int(out.query_mask.sum())
            sampled += int(out.response_mask.sum())
        return time.perf_counter() - started, prompt_tokens, sampled

    prefill_s, _, _ = sample(1)
    total_s, prompt_tokens, sampled = sample(max_new_tokens)
    return {"total_s": total_s, "prefill_s": prefill_s, "decode_s": total_s - prefill_s,
            "prompt_tokens": prompt_tokens, "sampled_tokens": sampled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="write the markdown table here (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rlhf_lib import models
    from rlhf_lib.config import load_preset
    from rlhf_lib.prompting import format_prompt

    cfg = load_preset(args.preset)
    tokenizer = models.load_tokenizer(cfg.model.name)
    torch.manual_seed(0)
    policy = models.lora_from_config(models.load_causal_lm(cfg.model.name), cfg.model).eval()
    n_params = sum(p.numel() for name, p in policy.named_parameters() if "lora_" not in name)
    texts = [format_prompt(tokenizer, p) for p in bench_prompts(args.prompts)]
    batch, new_tokens = cfg.generation.batch_size, cfg.generation.max_new_tokens
    designs = {  # name -> (batch size, length-sorted, merged)
        "plain@8": (8, False, False),
        f"plain@{batch}": (batch, False, False),
        f"merged@{batch}": (batch, False, True),
        f"fast@{batch}": (batch, True, True),
        f"fast@{2 * batch}": (2 * batch, True, True),
    }
    load_before = os.getloadavg()[0]
    gflops, runs = [], {name: [] for name in designs}
    with torch.no_grad():
        run_design(policy, tokenizer, texts[:4], 4, True, True, 4, seed=0)  # warm-up
        for round_index in range(args.repeats):
            gflops.append(matmul_gflops())
            for name, (size, fast, merged) in designs.items():
                result = run_design(policy, tokenizer, texts, size, fast, merged, new_tokens, seed=round_index * 1000)
                runs[name].append(result)
                print(f"round {round_index + 1} {name}: {result['total_s']:.1f} s", flush=True)
    rate = statistics.median(gflops)
    rows = []
    for name, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        tokens = median["prompt_tokens"] + median["sampled_tokens"]
        bound_s = 2 * n_params * tokens / (rate * 1e9)
        rows.append((name, median, bound_s))
    base_total = rows[0][1]["total_s"]
    lines = [
        f"# Sampling speed, preset `{args.preset}` ({cfg.model.name}, fp32, CPU)",
        "",
        *run_header("bench/bench_generation.py", argv, args.threads, load_before),
        f"- {args.prompts} prompts, {new_tokens} new tokens at temperature 1, LoRA rank {cfg.model.lora_rank}; "
        f"{n_params / 1e6:.1f} M parameters; fp32 matmul {rate:.0f} GFLOP/s (2048^2, median of {len(gflops)} in this run); "
        f"median of {args.repeats} interleaved rounds",
        "",
        "| design | total s | prefill s | decode s | sampled tokens | sampled tokens/s | % of arithmetic bound | speed vs plain@8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m, bound_s in rows:
        lines.append(
            f"| {name} | {m['total_s']:.1f} | {m['prefill_s']:.1f} | {m['decode_s']:.1f} | {m['sampled_tokens']:.0f} | "
            f"{m['sampled_tokens'] / m['total_s']:.0f} | {100 * bound_s / m['total_s']:.0f}% | {base_total / m['total_s']:.2f}x |"
        )
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
