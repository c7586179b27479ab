"""Sampling speed: the study's sampler (rlhf_lib.generation) against plain `model.generate`.

    python bench/bench_generation.py                                   # tiny preset (SmolLM2-135M), ~6 minutes
    python bench/bench_generation.py --preset micro --prompts 8        # seconds, a smoke test
    python bench/bench_generation.py --out bench/results/generation_bench.md

Every design samples the same prompts (a mix of short instructions and instructions after a passage of
0-180 words, like the study's closed-domain prompts) from the preset's base with a random LoRA adapter of the
preset's rank (speed does not depend on the adapter's values), temperature 1, `generation.max_new_tokens` new
tokens. Two shapes: `--prompts` prompts (RM comparisons, evaluation: many prompts per call) and the preset's
`ppo.rollout_batch` prompts (one PPO rollout). Designs, measured in one process, interleaved over `--repeats`
rounds (the median is reported):

  plain@B        transformers' generate on the peft model as trained (LoRA unmerged), prompts in order, B per batch
  sorted@B       LoRA merged into a copy of the weights, prompts batched by token length, transformers' generate
                 (the study's sampler until 2026-12-05)
  ours@P/D       rlhf_lib.generation.generate as sample_texts calls it: LoRA merged in place for the call
                 (`adapter_merged`), prompts sorted into groups of D rows, each group's prompts read in chunks of up
                 to P tokens (rows x longest prompt), then its D rows decoded together on one preallocated
                 key/value cache, each new token through `rlhf_lib.decoding.DecodeStep`
  hfstep@P/D     the same, each new token through the model's own forward instead (`decode_with_transformers`: the
                 study's decoding step until 2026-12-05; the deep-copy merge it replaced is in earlier results)
  flathead@P/D   ours with the decode step's LM head as one F.linear over the whole vocabulary (`decoding.HEAD_CHUNK`
                 None: the study's decode step until 2026-12-06), not in blocks of vocabulary rows

Prefill and decode are timed apart: prefill = the same call with one new token; decode = the rest. The
arithmetic bound is 2 x parameters x tokens processed (real prompt tokens + sampled tokens, padding excluded)
at the fp32 matmul rate measured in the same run; "% of bound" is that bound's time over the measured time.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import bench_parser, matmul_gflops, publish, run_header  # noqa: E402
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


def run_design(policy, tokenizer, texts: list[str], design: tuple[str, int, int], max_new_tokens: int,
               seed: int) -> dict[str, float]:
    """Seconds to sample every prompt (and with one new token: the prefill), and the tokens processed."""
    from rlhf_lib import decoding
    from rlhf_lib.generation import generate, generate_with_transformers, length_sorted_batches
    from rlhf_lib.models import adapter_merged

    kind, batch, decode_rows = design

    def merged_deep_copy(model):  # how the study merged until 2026-12-05: a copy of the whole peft model
        return nullcontext(copy.deepcopy(model).merge_and_unload())

    def sample(new_tokens: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        # The merge is part of the cost, once per call.
        merge = {"plain": nullcontext, "sorted": merged_deep_copy}.get(kind, adapter_merged)
        if kind == "plain":
            groups = [list(range(s, min(s + batch, len(texts)))) for s in range(0, len(texts), batch)]
        else:
            groups = length_sorted_batches(tokenizer, texts, batch if kind == "sorted" else decode_rows)
        prompt_tokens = sampled = 0
        with merge(policy) as model:
            for index, rows in enumerate(groups):
                prompts = [texts[i] for i in rows]
                if kind in ("plain", "sorted"):
                    out = generate_with_transformers(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                                     temperature=1.0, generator_seed=seed + index)
                else:
                    out = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, temperature=1.0,
                                   generator_seed=seed + index, prefill_tokens=batch,
                                   decode_with_transformers=kind == "hfstep")
                prompt_tokens += int(out.query_mask.sum())
                sampled += int(out.response_mask.sum())
        return time.perf_counter() - started, prompt_tokens, sampled

    head_chunk = decoding.HEAD_CHUNK
    decoding.HEAD_CHUNK = None if kind == "flathead" else head_chunk
    try:
        prefill_s, _, _ = sample(1)
        total_s, prompt_tokens, sampled = sample(max_new_tokens)
    finally:
        decoding.HEAD_CHUNK = head_chunk
    return {"total_s": total_s, "prefill_s": prefill_s, "decode_s": total_s - prefill_s,
            "prompt_tokens": prompt_tokens, "sampled_tokens": sampled}


def design_name(design: tuple[str, int, int]) -> str:
    kind, batch, decode_rows = design
    return f"{kind}@{batch}/{decode_rows}" if kind in ("ours", "hfstep", "flathead") else f"{kind}@{batch}"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, repeats=2)
    parser.add_argument("--prompts", type=int, default=48)
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
    batch, new_tokens = cfg.generation.batch_size, cfg.generation.max_new_tokens
    decode_rows, rollout = min(cfg.generation.decode_batch_size, args.prompts), cfg.ppo.rollout_batch
    prefill = cfg.generation.prefill_tokens
    shapes = {  # shape -> (prompts, designs); a design is (kind, batch rows or prefill tokens, decode rows)
        f"{args.prompts} prompts (RM comparisons, evaluation)": (
            [format_prompt(tokenizer, p) for p in bench_prompts(args.prompts)],
            [("plain", 8, 8), ("plain", batch, batch), ("sorted", batch, batch), ("ours", 4 * prefill, decode_rows),
             ("hfstep", prefill, decode_rows), ("flathead", prefill, decode_rows), ("ours", prefill, decode_rows)],
        ),
        f"{rollout} prompts (one PPO rollout, ppo.rollout_batch)": (
            [format_prompt(tokenizer, p) for p in bench_prompts(rollout)],
            [("plain", rollout, rollout), ("sorted", rollout, rollout), ("ours", 8 * prefill, rollout),
             ("hfstep", prefill, rollout), ("flathead", prefill, rollout), ("ours", prefill, rollout)],
        ),
    }
    load_before = os.getloadavg()[0]
    gflops, runs = [], {(shape, design): [] for shape, (_, designs) in shapes.items() for design in designs}
    with torch.no_grad():
        warm_texts = shapes[next(iter(shapes))][0][:4]
        run_design(policy, tokenizer, warm_texts, ("ours", prefill, 4), 4, seed=0)  # warm-up
        for round_index in range(args.repeats):
            gflops.append(matmul_gflops())
            for (shape, design), results in runs.items():
                result = run_design(policy, tokenizer, shapes[shape][0], design, new_tokens, seed=round_index * 1000)
                results.append(result)
                print(f"round {round_index + 1} {shape[:12]} {design_name(design)}: {result['total_s']:.1f} s", flush=True)
    rate = statistics.median(gflops)
    lines = [
        f"# Sampling speed, preset `{args.preset}` ({cfg.model.name}, fp32, CPU)",
        "",
        *run_header("bench/bench_generation.py", argv, args.threads, load_before),
        f"- {new_tokens} new tokens at temperature 1, LoRA rank {cfg.model.lora_rank}; {n_params / 1e6:.1f} M parameters; "
        f"fp32 matmul {rate:.0f} GFLOP/s (2048^2, median of {len(gflops)} in this run); median of {args.repeats} "
        "interleaved rounds",
    ]
    for shape, (_, designs) in shapes.items():
        lines += [
            "", f"## {shape}", "",
            "| design | total s | prefill s | decode s | prompt tokens | sampled tokens | sampled tokens/s | "
            "% of arithmetic bound | speed vs first row |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        first_total = None
        for design in designs:
            results = runs[(shape, design)]
            m = {key: statistics.median(r[key] for r in results) for key in results[0]}
            bound_s = 2 * n_params * (m["prompt_tokens"] + m["sampled_tokens"]) / (rate * 1e9)
            first_total = first_total or m["total_s"]
            lines.append(
                f"| {design_name(design)} | {m['total_s']:.1f} | {m['prefill_s']:.1f} | {m['decode_s']:.1f} | "
                f"{m['prompt_tokens']:.0f} | {m['sampled_tokens']:.0f} | {m['sampled_tokens'] / m['total_s']:.0f} | "
                f"{100 * bound_s / m['total_s']:.0f}% | {first_total / m['total_s']:.2f}x |"
            )
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
