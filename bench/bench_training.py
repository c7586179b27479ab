"""Training-step speed against the machine's arithmetic: SFT and RM steps, and the RM's cached-feature pass.

    python bench/bench_training.py                                  # tiny preset (SmolLM2-135M), ~3 minutes
    python bench/bench_training.py --preset micro --repeats 1       # seconds, a smoke test
    python bench/bench_training.py --out bench/results/training_bench.md

Every design runs the preset's base with a LoRA adapter of the preset's rank (fp32, dropout off) on random token
sequences of a fixed length (no padding: the bound below counts every token), measured in one process and
interleaved over `--repeats` rounds (the median is reported), beside an fp32 matmul measured in the same run:

  sft step        LoRA fine-tuning step: forward, causal-LM loss on the full logits, backward, AdamW step, at
                  `sft.batch_size` x `sft.max_seq_tokens`
  sft step, fused the same step as notebook 02's SFTTrainer (TRL 1.16) runs it: its fused LM head (trl's
                  `add_fused_lm_head`, with the log-probs, entropy and top-1 it asks for) projects through the LM
                  head in tiles and never holds the [tokens, vocabulary] logits
  ... prompt masked  the SFT steps with the loss on the last third of each row only (-100 before it), about the
                  response share of notebook 02's sequences (prompts <= 128 tokens, responses <= 48): the fused
                  head then projects only those positions; the plain step still computes every logit
  sft step, labelled head  the step notebook 02 takes on the CPU presets (`sft.fused_lm_head = false`):
                  rlhf_lib.sft.train.labelled_token_loss, the decoder as usual and the LM head only at the
                  labelled positions, with a plain log-softmax
  rm step         the end-to-end LoRA RM (GPU presets): forward to the last hidden states, a scalar head on the
                  mean of each row's states, a pairwise loss, backward, AdamW, at `reward.forward_batch` rows
  rm features     the CPU RM's cached-feature pass (rlhf_lib.reward, `method = "cached_head"`): forward only, no
                  gradients, every layer's states, at `reward.forward_batch` x `reward.max_seq_tokens`, with the
                  SFT adapter as loaded (unmerged) and merged into a copy of the weights

FLOPs counted: a forward is 2 x parameters x tokens (attention's own matmuls are left out: at these lengths they
are a few percent). A LoRA backward through frozen weights computes the inputs' gradients (another 2 x N x T) but no
weight gradients for the frozen matrices, so a LoRA step is counted as 4 x N x T (6 x N x T for full fine-tuning,
which nothing here does). With the prompt masked, the count is what the loss needs: the LM head (the tied
embedding matrix) only at the labelled positions, 4 x (N - N_head) x T + 4 x N_head x T_labelled, for every design
of that loss alike, so a design that computes logits nobody reads gets no credit for them. "% of matmul rate" is
the time the counted FLOPs take at the matmul rate over the measured time.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_common import matmul_gflops, publish, run_header, step_bench_parser, trained_looking_lora  # noqa: E402


def timed_steps(step, repeats_inside: int) -> float:
    """Seconds per call of `step`, after one warm-up call."""
    step()
    started = time.perf_counter()
    for _ in range(repeats_inside):
        step()
    return (time.perf_counter() - started) / repeats_inside


def optimizer_step(optimizer, loss_of):
    """A training step to time: `loss_of()` backpropagated, one optimizer step, the gradients cleared."""

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sft_step(model, optimizer, batch: torch.Tensor, labels: torch.Tensor, **forward):
    """One causal-LM LoRA step, with the model's own loss (`fused_lm_head=True`: TRL's fused LM head; call
    `add_fused_lm_head` on the base first)."""
    return optimizer_step(optimizer, lambda: model(input_ids=batch, attention_mask=torch.ones_like(batch),
                                                   labels=labels, **forward).loss)


def labelled_head_sft_step(model, optimizer, batch: torch.Tensor, labels: torch.Tensor):
    """One causal-LM LoRA step as the SFT stage takes it on the CPU presets: the LM head at labelled positions only."""
    from rlhf_lib.sft.train import labelled_token_loss

    inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": labels}
    return optimizer_step(optimizer, lambda: labelled_token_loss(model, inputs))


def rm_step(model, head: torch.nn.Module, optimizer, batch: torch.Tensor):
    """One end-to-end RM step: mean-pooled last states, scalar head, rows paired (0 beats 1, 2 beats 3, ...)."""

    def pairwise_loss() -> torch.Tensor:
        states = model(input_ids=batch, attention_mask=torch.ones_like(batch), output_hidden_states=True).hidden_states
        scores = head(states[-1].mean(1)).squeeze(-1)
        return -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()

    return optimizer_step(optimizer, pairwise_loss)


def feature_pass(model, batch: torch.Tensor):
    """The cached-head RM's forward: every layer's states, no gradients."""

    def step() -> None:
        with torch.no_grad():
            model(input_ids=batch, attention_mask=torch.ones_like(batch), output_hidden_states=True)

    return step


def main(argv: list[str] | None = None) -> int:
    args = step_bench_parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)

    from rlhf_lib import models
    from rlhf_lib.config import load_preset

    cfg = load_preset(args.preset)
    model = trained_looking_lora(cfg)
    n_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    vocab = models.load_tokenizer(cfg.model.name).vocab_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_module = models.ScalarHead(models.hidden_size_of(model))
    sft_optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    rm_optimizer = torch.optim.AdamW([*trainable, *head_module.parameters()], lr=1e-5)
    frozen = copy.deepcopy(model).merge_and_unload().eval()  # a merged copy beside the adapter model
    frozen.requires_grad_(False)

    def tokens(rows: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(rows * length))

    sft_batch = tokens(cfg.sft.batch_size, cfg.sft.max_seq_tokens)
    shape = f"{cfg.sft.batch_size} x {cfg.sft.max_seq_tokens}"
    response_labels = sft_batch.clone()
    response_labels[:, : 2 * cfg.sft.max_seq_tokens // 3] = -100
    from trl.trainer.utils import add_fused_lm_head

    # As SFTTrainer does: the plain forward stays the original, `fused_lm_head=True` takes the tiled head.
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    rm_batch = tokens(cfg.reward.forward_batch, cfg.reward.max_seq_tokens)
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # Parameters a token's forward multiplies by: the input embedding is a lookup (unless it is the tied head).
    matmul_params = n_params - (0 if tied else model.get_input_embeddings().weight.numel())
    full = 4 * matmul_params * sft_batch.numel()
    labelled = int((response_labels[:, 1:] != -100).sum())
    needed = 4 * (matmul_params - head) * sft_batch.numel() + 4 * head * labelled
    full_text, needed_text = "4 x N x T", f"4 x (N - N_head) x T + 4 x N_head x T_labelled ({labelled})"
    designs = {  # name -> (step, tokens per call, FLOPs counted per call, how they were counted)
        f"sft step ({shape})": (sft_step(model, sft_optimizer, sft_batch, sft_batch), sft_batch.numel(), full, full_text),
        f"sft step, fused ({shape})": (sft_step(model, sft_optimizer, sft_batch, sft_batch, fused_lm_head=True), sft_batch.numel(),
                                       full, full_text),
        f"sft step, prompt masked ({shape})": (sft_step(model, sft_optimizer, sft_batch, response_labels),
                                               sft_batch.numel(), needed, needed_text),
        f"sft step, fused, prompt masked ({shape})": (
            sft_step(model, sft_optimizer, sft_batch, response_labels, fused_lm_head=True), sft_batch.numel(), needed, needed_text),
        f"sft step, labelled head, prompt masked ({shape})": (
            labelled_head_sft_step(model, sft_optimizer, sft_batch, response_labels), sft_batch.numel(), needed,
            needed_text),
        f"rm step ({cfg.reward.forward_batch} x {cfg.reward.max_seq_tokens})": (
            rm_step(model, head_module, rm_optimizer, rm_batch), rm_batch.numel(), 4 * matmul_params * rm_batch.numel(),
            full_text),
        "rm features, adapter unmerged": (feature_pass(model, rm_batch), rm_batch.numel(),
                                          2 * matmul_params * rm_batch.numel(), "2 x N x T"),
        "rm features, adapter merged": (feature_pass(frozen, rm_batch), rm_batch.numel(),
                                        2 * matmul_params * rm_batch.numel(), "2 x N x T"),
    }
    load_before = os.getloadavg()[0]
    gflops, seconds = [], {name: [] for name in designs}
    for round_index in range(args.repeats):
        gflops.append(matmul_gflops())
        for name, (step, _, _, _) in designs.items():
            seconds[name].append(timed_steps(step, args.steps))
            print(f"round {round_index + 1} {name}: {seconds[name][-1]:.2f} s per call", flush=True)
    rate = statistics.median(gflops)
    lines = [
        f"# Training-step speed, preset `{args.preset}` ({cfg.model.name}, fp32, CPU, LoRA rank {cfg.model.lora_rank})",
        "",
        *run_header("bench/bench_training.py", argv, args.threads, load_before),
        f"- {n_params / 1e6:.1f} M parameters; fp32 matmul {rate:.0f} GFLOP/s (2048^2, median of {len(gflops)} in "
        f"this run); median of {args.repeats} interleaved rounds of {args.steps} calls",
        "",
        "| design | s per call | tokens per call | tokens/s | FLOPs counted | GFLOP/s | % of matmul rate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (_, n_tokens, flops, counted) in designs.items():
        s = statistics.median(seconds[name])
        achieved = flops / s / 1e9
        lines.append(f"| {name} | {s:.2f} | {n_tokens} | {n_tokens / s:.0f} | {counted} | {achieved:.0f} | "
                     f"{100 * achieved / rate:.0f}% |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
