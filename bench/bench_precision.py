"""Is bf16 fast on this CPU? fp32 against bf16 autocast for the study's own steps, beside both matmul rates.

    python bench/bench_precision.py                                  # tiny preset (SmolLM2-135M), ~3 minutes
    python bench/bench_precision.py --preset micro --repeats 1       # seconds, a smoke test
    python bench/bench_precision.py --out bench/results/precision_bench.md

The CPU presets compute in fp32 because bf16 was ~10x slower on the machines this study was first built on
(no bf16 instructions). A CPU with AVX512-BF16 or AMX runs bf16 matmuls natively; this measures what that would
change here, and says which instructions the CPU reports. Nothing in the study uses bf16 on a CPU; this is the
measurement a decision to allow it would start from. Designs, measured in one process and interleaved over
`--repeats` rounds (the median is reported), each in fp32 and under `torch.autocast("cpu", torch.bfloat16)`
(matmuls in bf16, weights kept fp32, reductions such as softmax and the loss in fp32):

  sft step      the SFT stage's step on the CPU presets (rlhf_lib.sft.train.labelled_token_loss, LoRA, AdamW),
                `sft.batch_size` x `sft.max_seq_tokens`, the loss on the last third of each row
  forward       a no-gradient forward with every layer's states (the RM's cached-feature pass),
                `reward.forward_batch` x `reward.max_seq_tokens`
  sampling      rlhf_lib.generation.generate on `ppo.rollout_batch` prompts, `generation.max_new_tokens` new
                tokens, LoRA merged (one PPO rollout's sampling)

"loss gap" is the SFT loss under bf16 autocast minus the fp32 loss on the same batch and weights (the first call).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import matmul_gflops, publish, run_header, step_bench_parser, trained_looking_lora  # noqa: E402
from bench_training import optimizer_step, timed_steps  # noqa: E402

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def cpu_flags() -> list[str]:
    """Which of BF16_FLAGS /proc/cpuinfo lists (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [flag for flag in BF16_FLAGS if flag in flags]


def precision(name: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = step_bench_parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench_generation import bench_prompts

    from rlhf_lib import models
    from rlhf_lib.config import load_preset
    from rlhf_lib.generation import generate
    from rlhf_lib.models import adapter_merged
    from rlhf_lib.prompting import format_prompt
    from rlhf_lib.sft.train import labelled_token_loss

    cfg = load_preset(args.preset)
    tokenizer = models.load_tokenizer(cfg.model.name)
    model = trained_looking_lora(cfg, dtype="float32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)  # weights stay put
    vocab = tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    sft_batch = torch.randint(0, vocab, (cfg.sft.batch_size, cfg.sft.max_seq_tokens), generator=generator)
    labels = sft_batch.clone()
    labels[:, : 2 * cfg.sft.max_seq_tokens // 3] = -100
    sft_inputs = {"input_ids": sft_batch, "attention_mask": torch.ones_like(sft_batch), "labels": labels}
    rm_batch = torch.randint(0, vocab, (cfg.reward.forward_batch, cfg.reward.max_seq_tokens), generator=generator)
    prompts = [format_prompt(tokenizer, p) for p in bench_prompts(cfg.ppo.rollout_batch)]
    losses: dict[str, float] = {}

    def sft_step(name: str):
        def loss_of() -> torch.Tensor:
            with precision(name):
                loss = labelled_token_loss(model, sft_inputs)
            losses.setdefault(name, loss.item())
            return loss
        return optimizer_step(optimizer, loss_of)

    def forward(name: str):
        def step() -> None:
            with torch.no_grad(), precision(name):
                models.hidden_states(model, rm_batch, torch.ones_like(rm_batch))
        return step

    def sampling(name: str):
        def step() -> None:
            with precision(name), adapter_merged(model) as sampler:
                generate(sampler, tokenizer, prompts, max_new_tokens=cfg.generation.max_new_tokens, temperature=1.0,
                         generator_seed=0, prefill_tokens=cfg.generation.prefill_tokens)
        return step

    shapes = {
        f"sft step ({cfg.sft.batch_size} x {cfg.sft.max_seq_tokens})": sft_step,
        f"forward ({cfg.reward.forward_batch} x {cfg.reward.max_seq_tokens})": forward,
        f"sampling ({cfg.ppo.rollout_batch} prompts, {cfg.generation.max_new_tokens} new tokens)": sampling,
    }
    designs = {(shape, name): make(name) for shape, make in shapes.items() for name in ("fp32", "bf16")}
    load_before = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in designs}
    for round_index in range(args.repeats):
        rates["fp32"].append(matmul_gflops())
        rates["bf16"].append(matmul_gflops(dtype=torch.bfloat16))
        for key, step in designs.items():
            seconds[key].append(timed_steps(step, args.steps))
            print(f"round {round_index + 1} {key[0]} {key[1]}: {seconds[key][-1]:.2f} s", flush=True)
    fp32_rate, bf16_rate = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
    flags = cpu_flags()
    lines = [
        f"# fp32 against bf16 autocast on this CPU, preset `{args.preset}` ({cfg.model.name}, LoRA rank "
        f"{cfg.model.lora_rank})",
        "",
        *run_header("bench/bench_precision.py", argv, args.threads, load_before),
        f"- CPU reports: {', '.join(flags) or 'none of ' + ', '.join(BF16_FLAGS)}",
        f"- matmul (2048^2, median of {args.repeats}): fp32 {fp32_rate:.0f} GFLOP/s, bf16 {bf16_rate:.0f} GFLOP/s "
        f"({bf16_rate / fp32_rate:.2f}x)",
        f"- SFT loss, bf16 autocast minus fp32, same batch and weights: {losses['bf16'] - losses['fp32']:+.4f} "
        f"(fp32 {losses['fp32']:.4f})",
        f"- median of {args.repeats} interleaved rounds of {args.steps} calls",
        "",
        "| design | fp32 s | bf16 autocast s | bf16 speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for shape in shapes:
        fp32, bf16 = statistics.median(seconds[(shape, "fp32")]), statistics.median(seconds[(shape, "bf16")])
        lines.append(f"| {shape} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
