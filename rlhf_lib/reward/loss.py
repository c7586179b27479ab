"""The K-wise loss (Ouyang et al. 2022, eq. 1): all C(K,2) pairs of one prompt's ranking are one batch element.

    loss(prompt) = -1/C(K,2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))      (ties dropped)"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def ranked_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs of one ranking; rank 0 is best; equal ranks (ties) give no pair."""
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i, j in itertools.combinations(range(len(ranks)), 2)
        if ranks[i] != ranks[j]
    ]


def kwise_loss(scores: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """-1/#pairs * sum log sigmoid(r_w - r_l) over every untied pair of one prompt's K completions."""
    pairs = ranked_pairs(ranks)
    if not pairs:
        return scores.sum() * 0.0  # all tied: no signal, but keep the graph valid
    winners = torch.tensor([w for w, _ in pairs], device=scores.device)
    losers = torch.tensor([lo for _, lo in pairs], device=scores.device)
    return -F.logsigmoid(scores[winners] - scores[losers]).mean()


