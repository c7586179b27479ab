"""Heads on a causal LM's hidden states: the ScalarHead (reward model, value function), hidden states with
positions counted over attended tokens (left padding shifts nothing), and pooling a row to one vector.
"""

from __future__ import annotations

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


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's hidden states [batch, seq, hidden] of one forward pass (0 = embeddings, -1 = the last layer,
    after the final norm), with positions counted over attended tokens so left padding shifts nothing."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,  # only the hidden states are needed; skip the LM head over every position
    )
    return out.hidden_states


def hidden_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """[batch, seq, hidden] hidden states after block `layer` (an index into `hidden_states`)."""
    return hidden_states(model, input_ids, attention_mask)[layer]


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
