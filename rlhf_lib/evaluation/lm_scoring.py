"""Log-likelihood scoring with a causal LM: continuation log-probabilities and per-document NLL.

Used by TruthfulQA multiple choice (sum of log-probs of each choice's tokens given the question) and
by the alignment tax's LM loss (token NLL on held-out prose)::

    from rlhf_lib.evaluation.lm_scoring import continuation_logprobs, document_nll
    sums, counts = continuation_logprobs(model, tok, ["Q: 2+2?\nA:"], [" 4"], batch_size=8)
    nll_sums, n_tokens = document_nll(model, tok, ["Some held-out paragraph."], max_tokens=256)

Context and continuation are tokenised separately and concatenated, so the continuation's tokens are
exactly those of the continuation text (no merge across the boundary; lm-evaluation-harness does the
same). Rows are left-padded with explicit position ids, so every row's continuation ends in the last
column, and the LM head runs only where a continuation token is predicted (`models.target_logits`; vocabularies
reach 262k tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rlhf_lib import models


def _start_token(tokenizer) -> int:
    # Something to condition the first token on when there is no context.
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("The tokenizer has no BOS, EOS or pad token to start an empty context with.")


def _pad_id(tokenizer) -> int:
    # Padded columns are masked out, so any id works when the tokenizer has no pad token.
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else _start_token(tokenizer)


@torch.no_grad()
def score_token_lists(
    model,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log p(continuation tokens | context) per row, and how many tokens were scored.

    Over-long rows lose context tokens from the left first, then continuation tokens from the right
    (`max_length` counts context + continuation). An empty continuation scores 0 over 0 tokens.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations.")
    rows: list[tuple[list[int], int]] = []  # (ids, number of continuation tokens at the end)
    for ctx, cont in zip(contexts, continuations, strict=True):
        ctx, cont = list(ctx), list(cont)
        if max_length is not None:
            cont = cont[: max(0, max_length - 1)]  # keep at least one context token
            ctx = ctx[-(max_length - len(cont)) :]
        if not ctx:
            raise ValueError("Every row needs at least one context token to condition on.")
        rows.append((ctx + cont, len(cont)))

    sums = np.zeros(len(rows))
    counts = np.array([n for _, n in rows], dtype=int)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    batches = -(-len(order) // batch_size)
    try:
        with models.merged_for_batches(model, batches):  # a LoRA adapter merged once for all batches
            for start in range(0, len(order), batch_size):
                batch = [i for i in order[start : start + batch_size] if counts[i] > 0]
                if not batch:
                    continue
                width = max(len(rows[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    seq = rows[i][0]
                    ids[r, width - len(seq) :] = torch.tensor(seq)
                    mask[r, width - len(seq) :] = 1
                # Column t's logits predict token t + 1: each row's continuation is predicted by the columns before it.
                predicts = torch.zeros((len(batch), width - 1), dtype=torch.bool)
                for r, i in enumerate(batch):
                    predicts[r, width - 1 - counts[i] :] = True
                inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                          "position_ids": models.position_ids_from_mask(mask).to(device)}
                predicts = predicts.to(device)
                logprobs = models.target_logprobs(model, inputs, predicts)  # [scored tokens]
                row_sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
                row_sums.index_add_(0, predicts.nonzero()[:, 0], logprobs.double())
                sums[batch] = row_sums.cpu().numpy()
    finally:
        model.train(was_training)
    return sums, counts


def continuation_logprobs(
    model,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of log-probs of each continuation's tokens given its context text, and the token counts."""
    ctx_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] or [_start_token(tokenizer)] for c in contexts]
    cont_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    return score_token_lists(model, ctx_ids, cont_ids, _pad_id(tokenizer), batch_size, max_length)


def document_nll(
    model, tokenizer, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Summed token NLL of each text (truncated to `max_tokens`) and the number of predicted tokens.

    The first token is only conditioned on (a start token is prepended when the tokenizer adds none),
    so every token of the text is predicted once.
    """
    contexts, continuations = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        contexts.append([_start_token(tokenizer)])
        continuations.append(ids)
    sums, counts = score_token_lists(model, contexts, continuations, _pad_id(tokenizer), batch_size, None)
    return -sums, counts
