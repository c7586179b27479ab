"""One rank of the 2-process PPO test (tests/test_ppo.py::test_two_process_ranks_stay_in_sync).

    torchrun --nproc_per_node 2 tests/ppo_ddp_worker.py ARTIFACTS_DIR OUT_DIR

Each rank rolls out its own prompts and takes one PPO step through accelerate (DDP over gloo); `gather`
then collects every rank's weight checksum (they must agree, and differ from the start). Then one
iteration of train_ppo runs across both ranks. Rank 0 writes OUT_DIR/sync.json for the test to read.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhf_lib.config import load_preset
from rlhf_lib.ppo import build_optimizer, build_roles, collect_rollout, ppo_update, train_ppo


def checksum(named: dict[str, torch.Tensor]) -> torch.Tensor:
    """Two numbers per run that differ if any trainable weight differs (sum and a position-weighted sum)."""
    flat = torch.cat([p.detach().double().flatten() for _, p in sorted(named.items())])
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
    return torch.stack([flat.sum(), (flat * weights).sum()])


def main() -> None:
    artifacts, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    # CPU gloo on purpose (the test is about DDP on CPUs); the test hides CUDA from us, since with a GPU visible
    # accelerate's CPU barrier still names one device per rank ('invalid device ordinal' on rank 1).
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = load_preset("micro", {"ppo.iterations": 1, "ppo.rollout_batch": 4, "ppo.minibatch": 2, "ppo.ppo_epochs": 1,
                                "ppo.learning_rate": 1e-3, "generation.max_new_tokens": 4})
    prompts = [f"Say something about item {i}." for i in range(8)]

    # 1. The pieces: each rank rolls out its own prompts, then one DDP step must leave identical weights.
    roles, tokenizer, _, _ = build_roles(cfg, artifacts / "sft", artifacts / "rm", device=accelerator.device)
    initial = checksum(roles.named_trainable())
    optimizer = build_optimizer(roles, dataclasses.replace(cfg.ppo, learning_rate=1e-3))
    model, optimizer = accelerator.prepare(roles, optimizer)
    torch.manual_seed(rank)
    rollout = collect_rollout(roles, tokenizer, prompts[rank::world][:2], cfg, kl_beta=0.02, seed=rank)
    ppo_update(model, optimizer, rollout, cfg.ppo, 2, torch.Generator().manual_seed(rank), accelerator=accelerator)
    live = accelerator.gather(checksum(roles.named_trainable()).unsqueeze(0))
    # Returns, not advantages: whitened advantages sum to about 0 on every rank, so their sums can tie.
    returns = accelerator.gather(rollout.returns.sum().reshape(1).double())
    ranks = accelerator.gather(torch.tensor([rank], dtype=torch.long))

    # 2. The whole loop: one iteration of train_ppo across both ranks.
    result = train_ppo(cfg, artifacts / "sft", artifacts / "rm", prompts, [], out_dir / "run", ptx=False,
                       accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        record = {
            "world_size": world,
            "ranks": ranks.tolist(),
            "checksums": live.tolist(),
            "initial_checksum": initial.tolist(),
            "return_sums": returns.tolist(),
            "iterations": result.iterations,
            "metrics_rows": len(result.metrics),
            "checkpoint": (result.out_dir / "checkpoint-000001" / "trainable.safetensors").exists(),
        }
        (out_dir / "sync.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
