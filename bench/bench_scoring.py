"""Scoring speed: RM features and continuation log-probs with the LoRA adapter live, or merged once per call.

    python bench/bench_scoring.py                                  # tiny preset (SmolLM2-135M), ~3 minutes
    python bench/bench_scoring.py --preset micro --texts 16        # seconds, a smoke test
    python bench/bench_scoring.py --out bench/results/scoring_bench.md

`RewardModel.features` (every RM score of the study) and `evaluation.lm_scoring` (TruthfulQA's multiple choice,
the alignment tax's LM loss) read many batches without gradients. Since 2026-12-06 they merge a LoRA adapter into
the weights once per call when a call reads more than one batch (`models.merged_for_batches`). Designs, on the same
texts (the bench prompts of bench_generation.py with short answers), interleaved over `--repeats` rounds (median):

  live     the same call with `models.merged_for_batches` replaced by a no-op: the adapter's matmuls on every
           token (what every call did before); the same batches, so the same padding
  merged   the call as the study makes it: the adapter merged once, then plain forwards (the merge is timed too)

The adapter is random LoRA of the preset's rank on the preset's base (speed does not depend on its values).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import bench_parser, publish, run_header, trained_looking_lora  # noqa: E402
from bench_generation import bench_prompts  # noqa: E402

ANSWERS = ["Because light scatters.", "The keeper loved the storms that shook the lamp.", "A hook, a pin, a clip.",
           "Weather is today; climate is decades.", "Paris.", "No, thank you, I cannot attend this year."]


@contextmanager
def adapter_live():
    """Within: scoring calls keep their LoRA adapter live, as they did before `models.merged_for_batches`."""
    from rlhf_lib import models

    merge = models.merged_for_batches
    models.merged_for_batches = lambda model, batches: nullcontext(model)
    try:
        yield
    finally:
        models.merged_for_batches = merge


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rlhf_lib import models
    from rlhf_lib.artifacts import RewardModel
    from rlhf_lib.config import load_preset
    from rlhf_lib.evaluation.lm_scoring import continuation_logprobs

    cfg = load_preset(args.preset)
    tokenizer = models.load_tokenizer(cfg.model.name)
    model = trained_looking_lora(cfg).eval()
    rm = RewardModel(model, models.ScalarHead(models.hidden_size_of(model)), tokenizer, cfg.model.name)
    prompts = bench_prompts(args.texts)
    answers = [ANSWERS[i % len(ANSWERS)] for i in range(args.texts)]
    batch = args.batch_size
    calls = {
        "RM features": lambda: rm.features(prompts, answers, batch_size=batch),
        "continuation log-probs": lambda: continuation_logprobs(model, tokenizer, prompts, answers, batch_size=batch),
    }
    jobs = {(what, design): call for what, call in calls.items() for design in ("live", "merged")}
    load_before = os.getloadavg()[0]
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    jobs[("RM features", "merged")]()  # warm-up
    for round_index in range(args.repeats):
        for key, job in jobs.items():
            with adapter_live() if key[1] == "live" else nullcontext():
                started = time.perf_counter()
                job()
            times[key].append(time.perf_counter() - started)
            print(f"round {round_index + 1} {key[0]} {key[1]}: {times[key][-1]:.2f} s", flush=True)

    lines = [
        f"# Scoring speed, preset `{args.preset}` ({cfg.model.name}, fp32, CPU)",
        "",
        *run_header("bench/bench_scoring.py", argv, args.threads, load_before),
        f"- {args.texts} (prompt, answer) texts in batches of {batch}; LoRA rank {cfg.model.lora_rank}; median of "
        f"{args.repeats} interleaved rounds",
        "",
        "| what | live adapter s | merged once s | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for what in ("RM features", "continuation log-probs"):
        live, merged = (statistics.median(times[(what, design)]) for design in ("live", "merged"))
        lines.append(f"| {what} | {live:.2f} | {merged:.2f} | {live / merged:.2f}x |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
