"""Batched sampling shared by RM data collection, PPO rollouts and evaluation.

Prompts are left-padded so every response starts at the same column; a response is cut after its
first EOS, and everything after it is padding with mask 0. `temperature=0` means greedy.

    from rlhf_lib.generation import generate, sample_texts
    batch = generate(model, tokenizer, ["<formatted prompt>"], max_new_tokens=32, temperature=1.0)
    batch.texts, batch.ended_with_eos, batch.response_mask
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf_lib.models import is_quantized


@dataclass
class Generated:
    """One batch of sampled responses, aligned for PPO: query | response columns."""

    query_ids: torch.Tensor  # [B, Lq] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, Lq] 1 on prompt tokens
    response_ids: torch.Tensor  # [B, Lr] sampled tokens; pad after the first EOS
    response_mask: torch.Tensor  # [B, Lr] 1 up to and including the first EOS
    ended_with_eos: torch.Tensor  # [B] bool: did the response end with EOS within the budget?
    texts: list[str]  # decoded responses, without special tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def truncate_at_eos(response_ids: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int):
    """Mask [B, L] that keeps tokens up to and including the first EOS; ids after it become pad."""
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_ids)
    # Positions strictly after the first EOS: cumulative count of EOS before this position > 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    ended = is_eos.any(dim=1)
    return response_ids.masked_fill(mask == 0, pad_token_id), mask, ended


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int | None = None,
    generator_seed: int | None = None,
) -> Generated:
    """Sample one response per (already formatted) prompt text, as one left-padded batch."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # an over-long prompt loses its start, never the answer cue at its end
    encoded = tokenizer(
        list(prompt_texts),
        return_tensors="pt",
        padding=True,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
        add_special_tokens=False,  # the prompt format already carries any special tokens
    ).to(device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    do_sample = temperature > 0
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,  # pure temperature sampling, as in the paper's rollouts
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    query_len = encoded["input_ids"].shape[1]
    response = output[:, query_len:]
    if response.shape[1] == 0:  # every row stopped immediately is impossible, but keep shapes valid
        response = torch.full((len(prompt_texts), 1), tokenizer.pad_token_id, device=device)
    response, mask, ended = truncate_at_eos(response, eos, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
    return Generated(encoded["input_ids"], encoded["attention_mask"], response, mask, ended, [t.strip() for t in texts])


def merged_copy(model):
    """A copy of a peft model with its active LoRA adapter merged into the weights: sampling then skips the
    adapter's extra matmuls on every token (bench/bench_generation.py measures it). The model itself when it has
    no adapter, when its adapter is switched off (`disable_adapter()`: the caller wants the base), or when its
    base is quantized (a merge would re-quantize the weights and change the policy)."""
    if not hasattr(model, "merge_and_unload") or is_quantized(model):
        return model
    if any(getattr(module, "_disable_adapters", False) for module in model.modules()):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


def length_sorted_batches(tokenizer, prompt_texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `prompt_texts` in batches of similar token length (longest first), so a batch pads little."""
    lengths = [len(ids) for ids in tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompt_texts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def sample_texts(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    desc: str = "sampling",
    progress: bool = True,
    return_ended: bool = False,
    fast: bool = True,
) -> list[str] | tuple[list[str], list[bool]]:
    """Responses for many prompts, in batches, with a progress bar; deterministic given the seed.

    `fast` (default): the LoRA adapter is merged into a copy of the weights once per call (`merged_copy`) and
    prompts are batched by token length (`length_sorted_batches`), then answers are put back in the prompts'
    order; the same distribution as the plain path (`fast=False`: the model as given, batches in order), at
    the speed bench/bench_generation.py measures. With `return_ended`, also whether each response ended with
    EOS (False: cut at `max_new_tokens`), so a scorer can see a truncated answer as truncated.
    """
    prompt_texts = list(prompt_texts)
    if fast:
        batches = length_sorted_batches(tokenizer, prompt_texts, batch_size)
        sampler = merged_copy(model)
    else:
        batches = [list(range(start, min(start + batch_size, len(prompt_texts)))) for start in range(0, len(prompt_texts), batch_size)]
        sampler = model
    texts: list[str] = [""] * len(prompt_texts)
    ended: list[bool] = [False] * len(prompt_texts)
    for batch_index, rows in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
        out = generate(
            sampler,
            tokenizer,
            [prompt_texts[i] for i in rows],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            max_prompt_tokens=max_prompt_tokens,
            generator_seed=seed * 100_003 + batch_index,
        )
        for i, text, done in zip(rows, out.texts, out.ended_with_eos.tolist(), strict=True):
            texts[i], ended[i] = text, bool(done)
    return (texts, ended) if return_ended else texts
