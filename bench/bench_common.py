"""What every benchmark in bench/ shares: the matmul rate it compares against, its header lines, its output.

    from bench_common import matmul_gflops, run_header, publish
    rate = matmul_gflops()                                        # fp32 GFLOP/s of this machine, now
    lines = ["# Title", "", *run_header("bench/bench_x.py", argv, threads, load_before)]
    publish(lines, args.out)                                      # print, and write the markdown when asked
"""

from __future__ import annotations

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
