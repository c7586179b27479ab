"""The one place where a user prompt becomes model input text: shared by SFT, generation, the RM.

Models with a chat template (SmolLM2-Instruct, Qwen-Instruct) use it; base models (gemma-3-270m,
the micro model) use a plain instruction template. SFT puts loss only on what follows `format_prompt`.

    from rlhf_lib.prompting import format_prompt
    text = format_prompt(tokenizer, "Name a primary colour.")  # ends where the response starts
"""

from __future__ import annotations

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
# Shown to the "GPT prompted" baseline: the paper's few-shot prefix that makes a base model follow instructions.
FEW_SHOT_PREFIX = (
    "Below are instructions, each followed by a response that completes the request helpfully, "
    "honestly and harmlessly.\n\n"
)


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def bos_prefix(tokenizer) -> str:
    """The BOS token as text when the tokenizer adds one by default (gemma needs it), else "".

    Prompt text is tokenised with `add_special_tokens=False` everywhere (chat templates carry their own
    special tokens), so the plain template adds BOS itself where the model expects it.
    """
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token if tokenizer.bos_token and ids and ids[0] == tokenizer.bos_token_id else ""


def format_prompt(tokenizer, prompt: str) -> str:
    """Model-ready text for one user prompt, ending exactly where the response begins."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return bos_prefix(tokenizer) + PLAIN_TEMPLATE.format(prompt=prompt)


def response_suffix(tokenizer) -> str:
    """What ends a response in training text: the EOS token (chat templates close turns with it)."""
    return tokenizer.eos_token or ""


def format_example(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, response text incl. EOS): SFT trains on the second part only."""
    return format_prompt(tokenizer, prompt), response.strip() + response_suffix(tokenizer)


def few_shot_prompt(tokenizer, prompt: str, examples: list[tuple[str, str]]) -> str:
    """The "GPT prompted" baseline: an instruction prefix and k demonstrations before the prompt."""
    shots = "".join(PLAIN_TEMPLATE.format(prompt=p) + r.strip() + "\n\n" for p, r in examples)
    return bos_prefix(tokenizer) + FEW_SHOT_PREFIX + shots + PLAIN_TEMPLATE.format(prompt=prompt)
