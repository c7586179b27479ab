"""The PPO rollout's scoring forwards (reference log-probs, values, RM scores): how rows are chunked, side by side.

    python bench/bench_rollout.py                                 # tiny preset (SmolLM2-135M), ~3 minutes
    python bench/bench_rollout.py --preset micro                  # seconds, a smoke test
    python bench/bench_rollout.py --out bench/results/rollout_bench.md

After sampling, `collect_rollout` runs three forwards over every [prompt | response] row. Designs, on one batch of
`--rows` rows (the bench prompts of bench_generation.py, a mix of lengths like the study's, each with a random
response of 8 to max_new_tokens tokens), interleaved over `--repeats` rounds (median):

  in-order@R   rows in their own order, R at a time, each chunk trimmed of its shared left padding (the study until
               2026-12-06, R = generation.batch_size)
  sorted@T     rows of similar length together, each chunk at most T tokens (rows x longest sequence;
               `ppo.forward_tokens`, through `generation.prefill_chunks`)
  merged@R     in-order@R with the frozen reference and reward adapters merged into the weights for their forward
               (the merge timed too): measured, not adopted

The SFT and RM adapters are random LoRA on the preset's base (bench_ppo.make_artifacts); the RM reads the middle
block, as the tiny study's chosen RM does, so the value and reward forwards stop there.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import bench_parser, publish, run_header  # noqa: E402
from bench_generation import bench_prompts  # noqa: E402
from bench_ppo import make_artifacts  # noqa: E402


def sampled_rows(tokenizer, rows: int, max_prompt_tokens: int, response_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, prompt + response] ids and mask: left-padded bench prompts and right-padded random responses."""
    from rlhf_lib.prompting import format_prompt

    prompts = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
               for p in bench_prompts(rows)]
    width = max(map(len, prompts))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.full((rows, width + response_tokens), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        answer = int(torch.randint(8, response_tokens + 1, (1,), generator=generator))
        input_ids[row, width - len(prompt) : width] = torch.tensor(prompt)
        input_ids[row, width : width + answer] = torch.randint(100, 10_000, (answer,), generator=generator)
        attention_mask[row, width - len(prompt) : width + answer] = 1
    return input_ids, attention_mask


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=16, help="rows of the rollout (the tiny preset's rollout_batch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rlhf_lib.config import load_preset
    from rlhf_lib.models import adapter_merged
    from rlhf_lib.ppo import build_roles
    from rlhf_lib.ppo.rollout import _chunked, trim_left_padding

    cfg = load_preset(args.preset)
    with tempfile.TemporaryDirectory() as scratch:
        make_artifacts(args.preset, Path(scratch))
        roles, tokenizer, _, _ = build_roles(cfg, Path(scratch) / "sft", Path(scratch) / "rm_mid")
    response_len = cfg.generation.max_new_tokens
    input_ids, attention_mask = sampled_rows(tokenizer, args.rows, cfg.data.max_prompt_tokens, response_len)
    forwards = {"reference": lambda i, m: roles.reference_logprobs(i, m, response_len),
                "value": lambda i, m: roles.values(i, m, response_len),
                "reward": lambda i, m: roles.reward_scores(i, m, response_len)}

    def in_order(rows: int, merge: bool = False):
        def run():
            outs = []
            for role, forward in forwards.items():
                frozen = merge and role != "value"
                with roles.role(role) as model, adapter_merged(model) if frozen else nullcontext():
                    outs.append(torch.cat([forward(*trim_left_padding(input_ids[i : i + rows], attention_mask[i : i + rows]))
                                           for i in range(0, args.rows, rows)]))
            return outs
        return run

    def length_sorted(budget: int):
        return lambda: [_chunked(forward, budget, input_ids, attention_mask) for forward in forwards.values()]

    batch = cfg.generation.batch_size
    designs = {f"in-order@{batch}": in_order(batch), **{f"sorted@{t}": length_sorted(t) for t in (512, 1024, 2048)},
               f"merged@{batch}": in_order(batch, merge=True)}
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in designs}
    with torch.no_grad():
        reference = designs[f"in-order@{batch}"]()  # also the warm-up
        worst = {name: max(float((a - b).abs().max()) for a, b in zip(run(), reference, strict=True))
                 for name, run in designs.items()}
        for round_index in range(args.repeats):
            for name, run in designs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
                print(f"round {round_index + 1} {name}: {times[name][-1]:.2f} s", flush=True)

    real = int(attention_mask.sum())
    lines = [
        f"# Rollout scoring forwards, preset `{args.preset}` ({cfg.model.name}, fp32, CPU)",
        "",
        *run_header("bench/bench_rollout.py", argv, args.threads, load_before),
        f"- {args.rows} rows, {real} real tokens in a [{args.rows} x {input_ids.shape[1]}] batch (prompts cut at "
        f"{cfg.data.max_prompt_tokens} tokens, responses up to {response_len}); reference (all blocks), value and "
        f"reward (to the middle block); median of {args.repeats} interleaved rounds",
        "",
        f"| design | seconds | speed-up vs in-order@{batch} | largest absolute difference from in-order@{batch} |",
        "| --- | --- | --- | --- |",
    ]
    base = statistics.median(times[f"in-order@{batch}"])
    for name in designs:
        seconds = statistics.median(times[name])
        lines.append(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x | {worst[name]:.1e} |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
