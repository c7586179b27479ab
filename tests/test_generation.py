"""The study's sampler (rlhf_lib.generation.generate) against transformers' generate and a plain forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_lib import models
from rlhf_lib.generation import generate, generate_with_transformers, sample_texts

PROMPTS = ["short", "a much longer prompt with many more words in it than the others", "mid sized prompt here",
           "x y", "another fairly long prompt that needs padding when batched", "one two three"]


@pytest.fixture(scope="module")
def policy():
    """micro in float32 with a LoRA whose B matrices are non-zero, merged (what every stage samples from)."""
    torch.manual_seed(0)
    model = models.add_lora(models.load_causal_lm("micro", dtype="float32"), rank=4, alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model.merge_and_unload().eval()


def test_prefill_chunks_group_similar_lengths_within_the_token_budget():
    from rlhf_lib.generation import prefill_chunks

    lengths = [3, 10, 4, 9, 1, 2]
    assert prefill_chunks(lengths, None) == [[0, 1, 2, 3, 4, 5]]
    assert prefill_chunks(lengths, 20) == [[1, 3], [2, 0, 5, 4]]  # 2 x 10 <= 20 tokens; then 4 x 4 <= 20
    assert prefill_chunks(lengths, 1) == [[1], [3], [2], [0], [5], [4]]  # an over-long row still gets its own chunk
    assert sorted(row for chunk in prefill_chunks(lengths, 7) for row in chunk) == list(range(6))


def test_prompts_are_read_once_in_their_chunks(policy, micro_tokenizer):
    """The model sees each prefill chunk once, trimmed to its own longest prompt, then one row-complete forward per
    decoded token: no second reading of the prompts (a name clash once sent every prefill back through one
    whole-batch forward, twice the work, with the same tokens out)."""
    from rlhf_lib.generation import encode_left_padded, prefill_chunks

    lengths = encode_left_padded(micro_tokenizer, PROMPTS, None)["attention_mask"].sum(1).tolist()
    chunks = prefill_chunks(lengths, 16)
    assert len(chunks) > 1
    shapes = []  # of every forward through the blocks: the prefill calls the decoder itself, a decoding step the LM
    hook = policy.get_decoder().register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                            with_kwargs=True)
    try:
        out = generate(policy, micro_tokenizer, PROMPTS, max_new_tokens=5, temperature=0.0, prefill_tokens=16,
                       decode_with_transformers=True)
        decoder_calls = len(shapes)
        own = generate(policy, micro_tokenizer, PROMPTS, max_new_tokens=5, temperature=0.0, prefill_tokens=16)
    finally:
        hook.remove()
    expected = [(len(rows), max(lengths[row] for row in rows)) for rows in chunks]
    assert shapes[: len(chunks)] == expected
    assert shapes[len(chunks) : decoder_calls] == [(len(PROMPTS), 1)] * (out.response_ids.shape[1] - 1)
    assert shapes[decoder_calls:] == expected  # DecodeStep decodes without the model's forward
    assert torch.equal(own.response_ids, out.response_ids)


def _small_decoder(model_type: str, **overrides):
    """A random 2-layer decoder of `model_type` with grouped key/value heads, in float32."""
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_class(**{**models.MICRO_CONFIG, "vocab_size": 49152, "num_attention_heads": 4,
                             "num_key_value_heads": 2, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1}), ("qwen2", {}),
])
def test_decode_step_samples_what_the_models_forward_samples(micro_tokenizer, model_type, overrides):
    from rlhf_lib.decoding import DecodeStep

    model = _small_decoder(model_type, **overrides)
    assert DecodeStep.for_model(model) is not None
    common = dict(max_new_tokens=10, temperature=1.0, generator_seed=2, prefill_tokens=16)
    own = generate(model, micro_tokenizer, PROMPTS, **common)
    reference = generate(model, micro_tokenizer, PROMPTS, **common, decode_with_transformers=True)
    assert torch.equal(own.response_ids, reference.response_ids) and own.response_mask.sum() > 3 * len(PROMPTS)
    torch.testing.assert_close(own.token_logprobs, reference.token_logprobs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(own.token_entropy, reference.token_entropy, rtol=1e-6, atol=1e-5)
    expected = _full_forward_logprobs(model, own, 1.0)
    torch.testing.assert_close(own.token_logprobs, expected, rtol=0, atol=1e-4)


def test_head_logits_equal_the_plain_head_for_any_vocabulary_blocking(monkeypatch):
    """The decode step's LM head in vocabulary blocks gives F.linear's logits, a last partial block included."""
    from rlhf_lib import decoding

    torch.manual_seed(0)
    hidden, head = torch.randn(5, 64), torch.randn(5000, 64)  # 5000 = 2 x 2048 + 904: the last block is partial
    expected = torch.nn.functional.linear(hidden, head)
    for block in (2048, 4096, 5000, 7, None):
        monkeypatch.setattr(decoding, "HEAD_CHUNK", block)
        logits = decoding.head_logits(hidden, head)
        assert logits.shape == (5, 5000) and logits.is_contiguous()
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_decode_step_applies_only_where_its_output_is_the_models(micro_tokenizer):
    from rlhf_lib.decoding import DecodeStep
    from rlhf_lib.models import adapter_merged

    peft_model = models.add_lora(_small_decoder("llama"), rank=4, alpha=8)
    assert DecodeStep.for_model(peft_model) is None  # the adapter's matmuls would be skipped
    with adapter_merged(peft_model) as merged:
        assert DecodeStep.for_model(merged) is not None
    with peft_model.disable_adapter():  # the bare base: the step applies, and samples what the forward samples
        assert DecodeStep.for_model(peft_model) is not None
        common = dict(max_new_tokens=6, temperature=0.0, prefill_tokens=16)
        assert torch.equal(generate(peft_model, micro_tokenizer, PROMPTS, **common).response_ids,
                           generate(peft_model, micro_tokenizer, PROMPTS, **common, decode_with_transformers=True).response_ids)
    assert DecodeStep.for_model(_small_decoder("llama").bfloat16()) is None
    assert DecodeStep.for_model(_small_decoder("qwen2", use_sliding_window=True, sliding_window=4,
                                               max_window_layers=0)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert DecodeStep.for_model(_small_decoder("llama")) is None


def _full_forward_logprobs(model, out, temperature: float, with_entropy: bool = False):
    """log pi(token | prefix) of every sampled token from one forward over query + response: [B, Lr], 0 on pad
    (and, with_entropy, the entropy of each step's distribution, 0 on pad)."""
    ids, mask = out.input_ids, out.attention_mask
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    width = out.query_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, width - 1 : -1] / temperature, dim=-1)
    token_logprobs = logprobs.gather(2, out.response_ids[..., None]).squeeze(-1) * out.response_mask
    if not with_entropy:
        return token_logprobs
    return token_logprobs, -(logprobs.exp() * logprobs).sum(-1) * out.response_mask


@pytest.mark.parametrize("prefill_tokens", [None, 1, 16, 40])
def test_greedy_answers_match_transformers_generate_for_any_prefill_chunking(policy, micro_tokenizer, prefill_tokens):
    reference = generate_with_transformers(policy, micro_tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    ours = generate(policy, micro_tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0,
                    prefill_tokens=prefill_tokens)
    assert torch.equal(ours.query_ids, reference.query_ids) and torch.equal(ours.query_mask, reference.query_mask)
    width = reference.response_ids.shape[1]
    assert torch.equal(ours.response_ids[:, :width], reference.response_ids)
    assert torch.equal(ours.response_mask[:, :width], reference.response_mask)
    assert ours.texts == reference.texts and torch.equal(ours.ended_with_eos, reference.ended_with_eos)
    assert len({tuple(row) for row in ours.response_ids.tolist()}) > 1  # different prompts, different answers


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_carry_the_log_probs_of_a_plain_forward(policy, micro_tokenizer, temperature):
    out = generate(policy, micro_tokenizer, PROMPTS, max_new_tokens=8, temperature=temperature,
                   generator_seed=5, prefill_tokens=16)
    expected, expected_entropy = _full_forward_logprobs(policy, out, temperature, with_entropy=True)
    assert out.response_mask.sum() > len(PROMPTS)  # more than one token per row was compared
    assert torch.allclose(out.token_logprobs, expected, atol=1e-4)
    assert torch.allclose(out.token_entropy, expected_entropy, atol=1e-4) and expected_entropy.max() > 0.1
    assert (expected[out.response_mask.bool()] < -0.5).any()  # really sampled, not argmax everywhere


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p(policy, micro_tokenizer):
    top_p = 0.3
    out = generate(policy, micro_tokenizer, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=top_p,
                   generator_seed=1, prefill_tokens=24)
    ids, mask = out.input_ids, out.attention_mask
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    width = out.query_ids.shape[1]
    for row in range(len(PROMPTS)):
        for step in range(int(out.response_mask[row].sum())):
            probs = logits[row, width - 1 + step].float().softmax(-1)
            ranked = probs.sort(descending=True)
            cutoff = int((ranked.values.cumsum(0) < top_p).sum()) + 1  # tokens kept: the mass before each is < top_p
            kept = ranked.indices[:cutoff]
            token = out.response_ids[row, step]
            assert token in kept
            renormalised = (probs[token] / probs[kept].sum()).log()
            assert abs(float(out.token_logprobs[row, step]) - float(renormalised)) < 1e-4


def test_sampling_is_deterministic_given_the_seed(policy, micro_tokenizer):
    def draw(seed):
        return generate(policy, micro_tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, generator_seed=seed,
                        prefill_tokens=16).response_ids

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


class _ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy choice is scripted: row r says token 7 r times, then EOS (id 2)."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.steps = vocab, 0
        self.calls: list[int] = []  # query width of each forward call

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, logits_to_keep=0, cache=None):
        self.calls.append(input_ids.shape[1])
        step = 0 if cache is None else cache + 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for row in range(input_ids.shape[0]):
            logits[row, -1, 2 if step >= row else 7] = 10.0
        return SimpleNamespace(logits=logits, cache=step)


def test_decoding_stops_once_every_row_has_ended_and_pads_finished_rows(micro_tokenizer):
    model = _ScriptedLM()
    out = generate(model, micro_tokenizer, ["a", "b c", "d e f"], max_new_tokens=10, temperature=0.0)
    assert out.response_ids.shape[1] == 3  # the last row ends at its third token: no more steps after that
    assert len(model.calls) == 3  # one prefill and two single-token steps
    assert out.ended_with_eos.tolist() == [True, True, True]
    assert out.response_mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    pad = micro_tokenizer.pad_token_id
    assert out.response_ids.tolist() == [[2, pad, pad], [7, 2, pad], [7, 7, 2]]


def test_rows_cut_at_the_budget_are_not_ended(micro_tokenizer):
    out = generate(_ScriptedLM(), micro_tokenizer, ["a", "b c", "d e f"], max_new_tokens=2, temperature=0.0)
    assert out.ended_with_eos.tolist() == [True, True, False]
    assert out.response_mask.tolist() == [[1, 0], [1, 1], [1, 1]]


def test_sample_texts_groups_by_length_and_restores_prompt_order(policy, micro_tokenizer):
    common = dict(max_new_tokens=6, temperature=0.0, progress=False, return_ended=True)
    grouped = sample_texts(policy, micro_tokenizer, PROMPTS, batch_size=2, decode_batch_size=3, **common)
    one_by_one = sample_texts(policy, micro_tokenizer, PROMPTS, batch_size=1, fast=False, **common)
    assert grouped == one_by_one
    assert len(set(grouped[0])) > 1


def test_each_draw_follows_the_tempered_distribution_and_never_picks_a_cut_token():
    from rlhf_lib.generation import _sample_next

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp(min=1e-30).log().repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs, _ = _sample_next(logits, 1.0, 1.0, generator)
    frequencies = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert torch.allclose(frequencies, probs.double(), atol=0.01)  # binomial sd at n=40000: <= 0.0025
    assert frequencies[4] == 0
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-5)
    tempered, _, _ = _sample_next(logits, 0.5, 1.0, generator)  # T = 0.5 squares the odds: 0.25/0.09/... renormalised
    expected = probs.double() ** 2 / (probs.double() ** 2).sum()
    assert torch.allclose(torch.bincount(tempered, minlength=5).double() / len(tempered), expected, atol=0.01)
    nucleus, _, nucleus_entropy = _sample_next(logits, 1.0, 0.7, generator)  # 0.5 + 0.3 reach 0.7: only the first two remain
    assert set(nucleus.tolist()) == {0, 1}
    kept = torch.tensor([0.5, 0.3]) / 0.8  # the entropy of the renormalised nucleus, the cut tokens adding nothing
    assert torch.allclose(nucleus_entropy, -(kept * kept.log()).sum().expand(len(nucleus)), atol=1e-5)


def test_non_finite_logits_raise_floating_point_error(micro_tokenizer):
    class NaNLM(_ScriptedLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[0, -1, 3] = float("nan")
            return out

    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(NaNLM(), micro_tokenizer, ["a", "b c"], max_new_tokens=4, temperature=1.0, generator_seed=0)
