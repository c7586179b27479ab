"""What every benchmark in bench/ shares: the matmul rate it compares against, its header lines, its output.

    from bench_common import matmul_gflops, run_header, publish
    rate = matmul_gflops()                                        # fp32 GFLOP/s of this machine, now
    args = step_bench_parser(__doc__).parse_args(argv)            # --preset --repeats --steps --threads --out
    args = bench_parser(__doc__, repeats=2).parse_args(argv)      # the same without --steps
    model = trained_looking_lora(cfg)                             # the preset's base + a LoRA with B != 0
    lines = ["# Title", "", *run_header("bench/bench_x.py", argv, threads, load_before)]
    publish(lines, args.out)                                      # print, and write the markdown when asked
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Matmul rate of this machine now, fp32 by default (the arithmetic bound's denominator)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def bench_parser(doc: str, repeats: int = 3) -> argparse.ArgumentParser:
    """The arguments every interleaved benchmark takes: --preset --repeats --threads --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="write the markdown table here (default: print only)")
    return parser


def step_bench_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments the step benchmarks (bench_training, bench_precision) share: bench_parser's and --steps."""
    parser = bench_parser(doc)
    parser.add_argument("--steps", type=int, default=2, help="timed calls per design per round")
    return parser


def trained_looking_lora(cfg, dtype: str | None = None):
    """The preset's base with a LoRA adapter of the preset's rank whose B matrices are drawn (B = 0 would let a
    merge skip nothing real), in train mode. `dtype` None: the preset's."""
    from rlhf_lib import models

    torch.manual_seed(0)
    model = models.lora_from_config(models.load_causal_lm(cfg.model.name, **({"dtype": dtype} if dtype else {})),
                                    cfg.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    return model.train()


def run_header(script: str, argv: list[str] | None, threads: int, load_before: float) -> list[str]:
    """The command, date, machine and load lines that say how a table was measured."""
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    return [
        f"- Command: `python {script} {arguments}`".rstrip(),
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {threads} threads; load average before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}",
    ]


def publish(lines: list[str], out: str) -> None:
    """Print the markdown; write it to `out` too when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
