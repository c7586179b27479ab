"""Batched sampling shared by RM data collection, PPO rollouts and evaluation.

Prompts are left-padded so every response starts at the same column; a response is cut after its
first EOS, and everything after it is padding with mask 0. `temperature=0` means greedy.

    from rlhf_lib.generation import generate, sample_texts
    batch = generate(model, tokenizer, ["<formatted prompt>"], max_new_tokens=32, temperature=1.0)
    batch.texts, batch.ended_with_eos, batch.response_mask

`generate` is the study's own decoding loop (prompts read in length-sorted chunks, then every row decoded
together on one key/value cache); `generate_with_transformers` is the same contract on `model.generate`, kept
as the reference the tests compare against and the baseline bench/bench_generation.py measures.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf_lib.decoding import DecodeStep
from rlhf_lib.models import adapter_merged, logits_are_head_output


@dataclass
class Generated:
    """One batch of sampled responses, aligned for PPO: query | response columns."""

    query_ids: torch.Tensor  # [B, Lq] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, Lq] 1 on prompt tokens
    response_ids: torch.Tensor  # [B, Lr] sampled tokens; pad after the first EOS
    response_mask: torch.Tensor  # [B, Lr] 1 up to and including the first EOS
    ended_with_eos: torch.Tensor  # [B] bool: did the response end with EOS within the budget?
    texts: list[str]  # decoded responses, without special tokens
    token_logprobs: torch.Tensor | None = None  # [B, Lr] log-prob of each sampled token where it was sampled; 0 on pad
    token_entropy: torch.Tensor | None = None  # [B, Lr] entropy of the distribution each token was drawn from; 0 on pad

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


def encode_left_padded(tokenizer, prompt_texts: Sequence[str], max_prompt_tokens: int | None):
    """The prompts as one left-padded batch (`input_ids`, `attention_mask`), so every response starts at the same
    column; an over-long prompt loses its start, never the answer cue at its end."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer(
        list(prompt_texts),
        return_tensors="pt",
        padding=True,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
        add_special_tokens=False,  # the prompt format already carries any special tokens
    )


@torch.no_grad()
def generate_with_transformers(
    model,
    tokenizer,
    prompt_texts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int | None = None,
    generator_seed: int | None = None,
) -> Generated:
    """`generate`'s contract on transformers' `model.generate` (one left-padded batch; `token_logprobs` None)."""
    device = next(model.parameters()).device
    encoded = encode_left_padded(tokenizer, prompt_texts, max_prompt_tokens).to(device)
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


def _eos_list(eos_token_id: int | list[int]) -> list[int]:
    return list(eos_token_id) if isinstance(eos_token_id, list | tuple) else [eos_token_id]


def _cache_kwarg(model) -> str:
    """The forward keyword of the key/value cache: `cache` since transformers 5.2x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _entropy(logprobs: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each row of [B, V] log-probabilities (tokens cut by top_p, at -inf, add nothing: their 0 x -inf
    is NaN, which nansum skips)."""
    probs = logprobs.exp() if probs is None else probs
    return -(probs * logprobs).nansum(dim=-1)


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """(next token, its log-prob under the distribution it was drawn from, that distribution's entropy) for each
    row of [B, V] logits.

    As transformers' warpers: logits / temperature, then the smallest set of tokens whose probability reaches
    top_p; temperature 0 is greedy (its log-prob and entropy are the untempered softmax's)."""
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
        return token, logprobs.gather(1, token[:, None]).squeeze(1), _entropy(logprobs)
    scaled = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        sorted_logits, sorted_index = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before this token already reached top_p
        outside[:, 0] = False
        scaled = scaled.masked_fill(outside.scatter(1, sorted_index, outside), float("-inf"))
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    # Inverse-CDF draw: one uniform per row. torch.multinomial (what transformers' generate calls) draws an
    # exponential for every vocabulary entry: 45 ms of a ~210 ms decode step at 48 rows x 49k tokens (profiled).
    cdf = probs.double().cumsum(dim=-1)
    # NaN or inf anywhere in a row survives into its total: one check per row, not one per probability (that
    # element-wise check took 1.2 ms of each ~80 ms decode step at 16 rows x 49k tokens, measured).
    if not torch.isfinite(cdf[:, -1]).all():
        raise FloatingPointError("non-finite sampling probabilities (NaN or inf in the logits)")
    uniform = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
    return token, logprobs.gather(1, token[:, None]).squeeze(1), _entropy(logprobs, probs)


def _mergeable(cache) -> bool:
    """Whether a cache is plain per-layer key/value tensors that can be left-padded and stacked by row (not a
    sliding-window or static layer, whose positions mean something else)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _preallocated_cache(parts: list[tuple[torch.Tensor | None, object]], rows: int, width: int, capacity: int):
    """One cache for all rows from the prefill caches of row chunks: each chunk's keys and values are written,
    right-aligned (left padding, masked out), into buffers of `capacity` positions, where decoding then writes
    each new token in place. transformers' DynamicLayer concatenates instead, a fresh copy of the whole cache per
    token and layer: 80% of a decode step at 48 rows here (profiled, allocation-bound)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, layer: int):
            super().__init__()
            first_keys, first_values = parts[0][1].layers[layer].keys, parts[0][1].layers[layer].values
            self.device, self.is_initialized, self.length = first_keys.device, True, width
            # Keys and values each keep their own dtype and width (under CPU autocast keys leave the rotary
            # embedding in fp32 while values stay bf16).
            self.key_buffer = first_keys.new_zeros((rows, first_keys.shape[1], capacity, first_keys.shape[3]))
            self.value_buffer = first_values.new_zeros((rows, first_values.shape[1], capacity, first_values.shape[3]))
            for index, cache in parts:
                keys, values = cache.layers[layer].keys, cache.layers[layer].values
                target = slice(None) if index is None else index
                self.key_buffer[target, :, width - keys.shape[2] : width] = keys
                self.value_buffer[target, :, width - values.shape[2] : width] = values
            self.keys, self.values = self.key_buffer[:, :, :width], self.value_buffer[:, :, :width]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            end = self.length + key_states.shape[2]
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(layer) for layer in range(len(parts[0][1].layers))]
    cache.preallocated = True  # what `DecodeStep` can write into
    return cache


def prefill_chunks(lengths: Sequence[int], token_budget: int | None) -> list[list[int]]:
    """Row indices in chunks for reading the prompts: longest first, each chunk as many rows as fit
    `token_budget` tokens at its longest prompt's length (at least one row); None: every row in one chunk, in order."""
    if token_budget is None:
        return [list(range(len(lengths)))]
    chunks: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if chunks and (len(chunks[-1]) + 1) * max(1, lengths[chunks[-1][0]]) <= token_budget:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def _prefill(model, query_ids: torch.Tensor, query_mask: torch.Tensor, token_budget: int | None, capacity: int):
    """Read the prompts: (cache for all rows in the [B, width] layout with room for `capacity` positions,
    [B, V] logits at each last prompt token).

    In chunks of rows of similar length (`prefill_chunks`), each trimmed to its own longest prompt; their
    caches are then left-padded with zeros (masked out, as padding is) to the common width and stacked by row."""
    rows, width = query_ids.shape
    lengths = query_mask.sum(dim=1).tolist()
    position_ids = (query_mask.cumsum(dim=1) - 1).clamp(min=0)  # as transformers' generate: count real tokens only

    head_alone = logits_are_head_output(model)

    def forward(index: torch.Tensor | None, chunk_width: int):
        ids, mask, pos = (t if index is None else t[index] for t in (query_ids, query_mask, position_ids))
        inputs = {"input_ids": ids[:, width - chunk_width:], "attention_mask": mask[:, width - chunk_width:],
                  "position_ids": pos[:, width - chunk_width:], "use_cache": True}
        if head_alone:  # the head on the last states as one matmul, not logits_to_keep's matmul per row (target_logits)
            out = model.get_decoder()(**inputs)
            return _output_cache(out), model.get_output_embeddings()(out.last_hidden_state[:, -1])
        out = model(**inputs, logits_to_keep=1)
        return _output_cache(out), out.logits[:, -1, :]

    row_chunks = prefill_chunks(lengths, token_budget)
    chunks = [None] if len(row_chunks) == 1 else [torch.tensor(rows_, device=query_ids.device) for rows_ in row_chunks]
    parts, logits = [], None
    for index in chunks:
        chunk_width = width if index is None else max(1, max(lengths[row] for row in index.tolist()))
        cache, chunk_logits = forward(index, chunk_width)
        if not _mergeable(cache):  # e.g. sliding-window layers: transformers' own cache, every prompt in one batch
            return (cache, chunk_logits) if index is None else forward(None, width)
        if index is None:
            logits = chunk_logits
        else:
            if logits is None:
                logits = chunk_logits.new_empty((rows, chunk_logits.shape[-1]))
            logits[index] = chunk_logits
        parts.append((index, cache))
    return _preallocated_cache(parts, rows, width, capacity), logits


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
    prefill_tokens: int | None = None,
    decode_with_transformers: bool = False,
) -> Generated:
    """Sample one response per (already formatted) prompt text: the study's sampler.

    All rows are decoded together, one forward per new token, so each step reads the weights once for every
    row. The prompts are read first ("prefill") in chunks of rows of similar token length, up to `prefill_tokens`
    tokens each (None: all rows at once), so a chunk pads little and its activations stay in cache; the chunks'
    key/value caches are then left-padded to one layout, the layout `generate_with_transformers` would give the
    whole batch. Each new token then goes through `decoding.DecodeStep` where it knows the model (a Llama-style
    decoder in float32 on the CPU), else (or with `decode_with_transformers`) through the model's own forward.
    Decoding stops once every row has sampled EOS.
    Token log-probabilities under the sampling distribution, and its entropy at each step, are returned in
    `Generated.token_logprobs` and `Generated.token_entropy`.
    """
    device = next(model.parameters()).device
    encoded = encode_left_padded(tokenizer, prompt_texts, max_prompt_tokens).to(device)
    query_ids, query_mask = encoded["input_ids"], encoded["attention_mask"]
    rows, width, pad_id = *query_ids.shape, tokenizer.pad_token_id
    generator = None  # no seed: torch's global generator, as transformers' generate uses
    if generator_seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(generator_seed)
    eos_ids = torch.tensor(_eos_list(tokenizer.eos_token_id), device=device)

    cache_kwarg = _cache_kwarg(model)
    was_training = model.training
    model.eval()
    try:
        cache, logits = _prefill(model, query_ids, query_mask, prefill_tokens, capacity=width + max_new_tokens)
        mask = query_mask
        decode_step = None
        if not decode_with_transformers and getattr(cache, "preallocated", False):
            decode_step = DecodeStep.for_model(model)
        if decode_step is not None:  # 0 where a row attends a cache position, -inf on its prompt's left padding
            attention_bias = torch.zeros((rows, width + max_new_tokens), device=device)
            attention_bias[:, :width].masked_fill_(query_mask == 0, float("-inf"))
        first_position = query_mask.sum(dim=1, keepdim=True)  # of each row's first new token
        tokens, logprobs, entropies = [], [], []
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token, logprob, entropy = _sample_next(logits, temperature, top_p, generator)
            token = token.masked_fill(finished, pad_id)  # a finished row only pads, as transformers' generate does
            tokens.append(token)
            logprobs.append(logprob.masked_fill(finished, 0.0))
            entropies.append(entropy.masked_fill(finished, 0.0))
            finished |= torch.isin(token, eos_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if decode_step is not None:
                logits = decode_step(token, first_position + step, cache, attention_bias)
                continue
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        use_cache=True, **{cache_kwarg: cache})
            cache, logits = _output_cache(out), out.logits[:, -1, :]
    finally:
        model.train(was_training)
    response = torch.stack(tokens, dim=1) if tokens else torch.full((rows, 1), pad_id, device=device)
    token_logprobs = torch.stack(logprobs, dim=1) if logprobs else torch.zeros(response.shape, device=device)
    token_entropy = torch.stack(entropies, dim=1) if entropies else torch.zeros(response.shape, device=device)
    response, response_mask, ended = truncate_at_eos(response, tokenizer.eos_token_id, pad_id)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Generated(query_ids, query_mask, response, response_mask, ended, [t.strip() for t in texts],
                     token_logprobs * response_mask, token_entropy * response_mask)


def length_sorted_batches(tokenizer, prompt_texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `prompt_texts` in batches of similar token length (longest first), so a batch pads little."""
    lengths = [len(ids) for ids in tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompt_texts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batching(gen) -> dict[str, int]:
    """`sample_texts`' batching arguments from a preset's `[generation]` section (a `GenerationConfig`)."""
    return {"batch_size": gen.batch_size, "decode_batch_size": gen.decode_batch_size, "prefill_tokens": gen.prefill_tokens}


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
    decode_batch_size: int | None = None,
    prefill_tokens: int | None = 512,
) -> list[str] | tuple[list[str], list[bool]]:
    """Responses for many prompts, with a progress bar; deterministic given the seed.

    `fast` (default): the LoRA adapter is merged into the weights once per call (`adapter_merged`), the
    prompts are sorted by token length into groups of `decode_batch_size` rows (default 4 x `batch_size`), and
    `generate` reads each group's prompts in chunks of up to `prefill_tokens` tokens, then decodes its rows together; the
    answers are put back in the prompts' order. `fast=False` is the reference: the model as given, transformers'
    generate on batches of `batch_size` in order. Both sample the same distribution; bench/bench_generation.py
    measures the speed. With `return_ended`, also whether each response ended with EOS (False: cut at
    `max_new_tokens`), so a scorer can see a truncated answer as truncated.
    """
    prompt_texts = list(prompt_texts)
    if fast:
        groups = length_sorted_batches(tokenizer, prompt_texts, decode_batch_size or 4 * batch_size)
        merge, sample = adapter_merged(model), generate
    else:
        groups = [list(range(start, min(start + batch_size, len(prompt_texts))))
                  for start in range(0, len(prompt_texts), batch_size)]
        merge, sample = nullcontext(model), generate_with_transformers
    texts: list[str] = [""] * len(prompt_texts)
    ended: list[bool] = [False] * len(prompt_texts)
    with merge as sampler, tqdm(total=len(prompt_texts), desc=desc, disable=not progress, unit="prompt") as bar:
        for group_index, rows in enumerate(groups):
            out = sample(
                sampler,
                tokenizer,
                [prompt_texts[i] for i in rows],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                max_prompt_tokens=max_prompt_tokens,
                generator_seed=seed * 100_003 + group_index,
                **({"prefill_tokens": prefill_tokens} if fast else {}),
            )
            for i, text, done in zip(rows, out.texts, out.ended_with_eos.tolist(), strict=True):
                texts[i], ended[i] = text, bool(done)
            bar.update(len(rows))
    return (texts, ended) if return_ended else texts
