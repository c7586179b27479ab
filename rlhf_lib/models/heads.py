"""Heads on a causal LM's hidden states: the ScalarHead (reward model, value function), hidden states with
positions counted over attended tokens (left padding shifts nothing), and pooling a row to one vector.

A head that reads block k of n runs only the first k blocks (`hidden_states(..., through=k)`): the blocks above
cannot change what it reads, so their forward (and, for a trained value head, their backward) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# A scalar head (reward model, value function)
# --------------------------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row (works for left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class ScalarHead(nn.Module):
    """A linear map from the final hidden state to one number per position (reward or value)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> ScalarHead:
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(device))
        head = cls(state["linear.weight"].shape[1]).to(device)
        head.load_state_dict(state)
        return head


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.hidden_size


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, so left padding does not shift a sequence."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder(model: nn.Module) -> nn.Module | None:
    """The module that holds a causal LM's blocks (`layers`) and final `norm`, through a peft wrapper; None if the
    model is not laid out so (then every block runs)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(getattr(decoder, "layers", None), nn.ModuleList) and isinstance(getattr(decoder, "norm", None), nn.Module):
        return decoder
    return None


def block_count(model: nn.Module) -> int:
    """Transformer blocks of a causal LM (`hidden_states` has one more entry: the embeddings)."""
    config = model.config
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers


def cut_depth(model: nn.Module, layer: int) -> int | None:
    """k when hidden_states[layer] (negative: counted from the end) is block k's output with 0 < k < blocks: a head
    reading it needs the first k blocks only. None for the embeddings and the last layer: a whole forward."""
    blocks = block_count(model)
    depth = layer % (blocks + 1)
    return depth if 0 < depth < blocks else None


@contextmanager
def first_blocks_only(model: nn.Module, blocks: int) -> Iterator[bool]:
    """Within: the model runs only its first `blocks` blocks and leaves out the final norm, so the last entry of
    `hidden_states` is block `blocks`' own output, as in a forward through every block. Yields whether it could
    (False: a model without `layers` and `norm`, left whole)."""
    decoder = _decoder(model)
    if decoder is None:
        yield False
        return
    try:  # transformers 5 records hidden states by hooks it installs on the blocks present at the first forward
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older versions collect them in the forward itself
        pass
    else:
        maybe_install_capturing_hooks(decoder)  # on every block now, or a later whole forward would miss the upper ones
    layers, norm = decoder.layers, decoder.norm
    decoder.layers, decoder.norm = nn.ModuleList(list(layers)[:blocks]), nn.Identity()
    try:
        yield True
    finally:
        decoder.layers, decoder.norm = layers, norm


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, through: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Every layer's hidden states [batch, seq, hidden] of one forward pass (0 = embeddings, -1 = the last layer,
    after the final norm), with positions counted over attended tokens so left padding shifts nothing.

    through=k (0 < k < blocks): only the entries 0..k, computed by the first k blocks alone (the same numbers).
    The LM head does not run (the decoder alone, where the model has one).
    """
    decoder = _decoder(model)

    def forward() -> tuple[torch.Tensor, ...]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "position_ids": position_ids_from_mask(attention_mask), "output_hidden_states": True, "use_cache": False}
        if decoder is not None:
            return decoder(**inputs).hidden_states
        return model(**inputs, logits_to_keep=1).hidden_states  # the head at one position per row only

    if through is None or cut_depth(model, through) != through:  # not 0 < through < blocks: every block runs
        return forward()
    with first_blocks_only(model, through) as truncated:
        states = forward()
    if truncated and len(states) != through + 1:
        raise RuntimeError(f"{type(model).__name__} returned {len(states)} hidden states from its first {through} blocks, "
                           f"not {through + 1}: read them with through=None.")
    return states[: through + 1]


# Configuration fields by which a model's logits are more than its LM head's output (gemma 2's tanh cap, Cohere's and
# Granite's scale).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def logits_are_head_output(model: nn.Module) -> bool:
    """Whether `model`'s logits are its LM head applied to its decoder's last hidden state, nothing after it: then
    the head can be run on chosen states alone (`target_logits`)."""
    config = getattr(model, "config", None)
    return (config is not None and all(getattr(config, name, None) is None for name in _LOGIT_TRANSFORMS)
            and _decoder(model) is not None)


def target_logits(model: nn.Module, inputs: dict[str, torch.Tensor], predicts: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocabulary] of the N positions where `predicts` [batch, seq - 1] is True, in row-major order:
    position j's logits predict token j + 1. `inputs` are the forward's (input_ids, attention_mask, position_ids).

    The decoder runs over every position, the LM head only at the N chosen states, gathered into one contiguous
    [N, hidden] matrix. A model's own `logits_to_keep` projects a strided slice of its states instead, which torch
    runs as a batched matmul over a copy of the head per row (2.4x the time of one matmul at PPO's shapes, profiled),
    and it covers every column of the slice, padding included. A model whose logits are more than its head's output
    (`logits_are_head_output`) runs whole, its logits kept from the first chosen column on, and gathered."""
    if not logits_are_head_output(model):
        chosen_columns = predicts.any(dim=0).nonzero()
        first = int(chosen_columns[0]) if len(chosen_columns) else predicts.shape[1]
        logits = model(**inputs, use_cache=False, logits_to_keep=predicts.shape[1] + 1 - first).logits
        return logits[:, :-1][predicts[:, first:]]
    hidden = _decoder(model)(**inputs, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][predicts])


def target_logprobs(model: nn.Module, inputs: dict[str, torch.Tensor], predicts: torch.Tensor) -> torch.Tensor:
    """log p(token j + 1) [N] in float32 at the N positions j where `predicts` is True, row-major (`target_logits`:
    the LM head runs at those states only). A sequence's log-probability is the sum over its row's entries."""
    logits = target_logits(model, inputs, predicts).float()
    targets = inputs["input_ids"][:, 1:][predicts]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def layer_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> list[torch.Tensor]:
    """The hidden states [batch, seq, hidden] of each of `layers` (indices into `hidden_states`, negative ones
    counted from the end), from a forward through the blocks up to the deepest of them only."""
    wanted = [layer % (block_count(model) + 1) for layer in layers]
    states = hidden_states(model, input_ids, attention_mask, through=max(wanted))
    truncated = cut_depth(model, max(wanted)) is not None  # then `states` holds entries 0..max(wanted) only
    return [states[index] for index in (wanted if truncated else layers)]


def hidden_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """[batch, seq, hidden] hidden states after block `layer` (an index into `hidden_states`); only the blocks up
    to it run."""
    return layer_states(model, input_ids, attention_mask, [layer])[0]


def scalar_outputs(
    model: nn.Module, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1
) -> torch.Tensor:
    """Per-position scalars [batch, seq] from a causal LM's hidden layer `layer` and a ScalarHead."""
    hidden = hidden_layer(model, input_ids, attention_mask, layer)
    return head(hidden.to(head.linear.weight.dtype))


POOLINGS = ("last", "mean_response")


def pool_states(hidden: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, hidden] summary of each row: the last attended token's state ("last"), or the mean over the
    response's tokens ("mean_response"; rows with no response token fall back to the last token)."""
    last = last_token_index(attention_mask)
    at_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "last":
        return at_last
    if pooling != "mean_response":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    weights = (response_mask * attention_mask).to(hidden.dtype).unsqueeze(-1)
    count = weights.sum(1)
    mean = (hidden * weights).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, at_last)
