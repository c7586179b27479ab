"""Seeded, disjoint prompt splits (SFT / RM / PPO / eval) with the paper's use-case mix.

    from rlhf_lib.data.splits import make_splits, check_no_leakage
    result = make_splits(pool_rows, {"sft": 64, "rm": 32, "ppo": 32, "eval": 32}, prefix_chars=60, seed=0)
    result.splits["eval"][0]["split"]      # 'eval'
    check_no_leakage(result.splits, 60)   # raises DataError if any prompt crosses two splits

Disjointness follows the paper, which deduplicated prompts sharing a long common prefix. Two
prompts are near-duplicates when, after `normalise_for_dedup` (lower case, punctuation and
whitespace collapsed), they share their first `prefix_chars` characters, or when one whole
normalised prompt (at least `prefix_chars // 3` characters long) is a prefix of the other.
Near-duplicates are joined transitively into groups (union-find), and a group never spans two
splits: the first row drawn from a group claims the whole group for its split, and rows of a
claimed group that its split does not need are given to no other split (diversity first: a small
split is not filled with several questions about one passage). The offline sources build prompts input-first (see rlhf_lib.data.bigbench), so the key is
the human-written input, not the instruction that every prompt of a task shares; questions about
one passage share that passage's prefix and therefore stay in one split.

Balance: each split's cap is apportioned over the use-case categories present in the pool in
proportion to the paper's Table 1 shares (largest remainder), and within a category rows are drawn
round-robin over tasks (one natural_instructions subtask cannot fill a category). A category with
too few rows leaves its shortfall to the others, in order of their shares. Splits are filled in the
order eval, sft, rm, ppo, so the held-out evaluation set gets first pick of scarce categories.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf_lib.data.common import normalise_for_dedup
from rlhf_lib.data.schema import CATEGORIES, PAPER_CATEGORY_SHARE, SPLITS, DataError

FILL_ORDER = ("eval", "sft", "rm", "ppo")


def dedup_key(text: str, prefix_chars: int) -> str:
    """The normalised leading characters that near-duplicates share."""
    return normalise_for_dedup(text)[:prefix_chars]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_groups(texts: Sequence[str], prefix_chars: int) -> list[int]:
    """A group id per text; texts in one group are (transitively) near-duplicates."""
    keys = [dedup_key(t, prefix_chars) for t in texts]
    uf = _UnionFind(len(keys))
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            uf.union(first[key], i)
        else:
            first[key] = i
    # A short prompt that is the start of another prompt: in sorted order, every key that extends
    # `s` follows `s` contiguously, so a stack of the current chain of short prefixes finds them all.
    min_chars = max(1, prefix_chars // 3)
    stack: list[str] = []
    for key in sorted(first):
        while stack and not key.startswith(stack[-1]):
            stack.pop()
        if stack:
            uf.union(first[stack[-1]], first[key])
        if min_chars <= len(key) < prefix_chars:
            stack.append(key)
    return [uf.find(i) for i in range(len(keys))]


def apportion(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split `total` into integers proportional to `shares` (largest-remainder method)."""
    weight = sum(shares.values())
    if total <= 0 or not shares:
        return dict.fromkeys(shares, 0)
    if weight <= 0:
        shares, weight = dict.fromkeys(shares, 1.0), float(len(shares))
    exact = {k: total * v / weight for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(shares, key=lambda k: (-(exact[k] - counts[k]), -shares[k], k))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


@dataclass
class SplitResult:
    """The splits (rows with `split` set), and how far each fell short of its cap."""

    splits: dict[str, list[dict[str, Any]]]
    shortfall: dict[str, int] = field(default_factory=dict)


def make_splits(
    rows: Sequence[Mapping[str, Any]],
    caps: Mapping[str, int],
    *,
    prefix_chars: int,
    seed: int,
    shares: Mapping[str, float] | None = None,
) -> SplitResult:
    """Draw disjoint splits of at most `caps[split]` rows each from a pool of PROMPT_FEATURES rows."""
    unknown = set(caps) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    rng = random.Random(seed)
    groups = near_duplicate_groups([r["prompt"] for r in rows], prefix_chars)
    queues: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        queues[row["category"]][row["task"]].append(i)
    task_order: dict[str, list[str]] = {}
    for category, tasks in queues.items():
        for indices in tasks.values():
            rng.shuffle(indices)  # popped from the end
        task_order[category] = sorted(tasks)
        rng.shuffle(task_order[category])
    cursor = dict.fromkeys(queues, 0)
    share_of = dict(PAPER_CATEGORY_SHARE if shares is None else shares)
    present = [c for c in CATEGORIES if c in queues] + sorted(c for c in queues if c not in CATEGORIES)
    group_split: dict[int, str] = {}

    def draw(split: str, category: str) -> int | None:
        """Next usable row of `category` for `split`, taking tasks in turn; None when exhausted."""
        order = task_order[category]
        while order:
            position = cursor[category] % len(order)
            queue = queues[category][order[position]]
            while queue:
                i = queue.pop()
                owner = group_split.get(groups[i])
                if owner is None or owner == split:
                    group_split[groups[i]] = split
                    cursor[category] = position + 1
                    return i
                # A near-duplicate of a row in an earlier split: unusable by any later split too.
            order.pop(position)
            cursor[category] = position
        return None

    out: dict[str, list[dict[str, Any]]] = {}
    shortfall: dict[str, int] = {}
    for split in [s for s in FILL_ORDER if s in caps]:
        chosen: list[int] = []
        quotas = apportion(caps[split], {c: share_of.get(c, 0.0) for c in present})
        for category in present:
            for _ in range(quotas[category]):
                i = draw(split, category)
                if i is None:
                    break
                chosen.append(i)
        fill = sorted(present, key=lambda c: -share_of.get(c, 0.0))
        while len(chosen) < caps[split] and fill:
            for category in list(fill):
                if len(chosen) >= caps[split]:
                    break
                i = draw(split, category)
                if i is None:
                    fill.remove(category)
                else:
                    chosen.append(i)
        rng.shuffle(chosen)  # mix categories within the split
        out[split] = [{**rows[i], "split": split} for i in chosen]
        shortfall[split] = caps[split] - len(chosen)
    return SplitResult(out, shortfall)


def _split_rows(splits: Mapping[str, Iterable[Mapping[str, Any]]] | Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(split, row) pairs from a mapping of split -> rows, or from one Dataset with a `split` column."""
    if isinstance(splits, Mapping):
        return [(name, row) for name, rows in splits.items() for row in rows]
    return [(row["split"], row) for row in splits]


def check_no_leakage(splits: Mapping[str, Iterable[Mapping[str, Any]]] | Any, prefix_chars: int = 60) -> None:
    """Raise DataError if an id, a prompt or a near-duplicate prefix appears in two splits.

    `splits` is a mapping split -> rows (dicts or a Dataset), or one Dataset with a `split` column.
    """
    pairs = _split_rows(splits)
    seen_ids: dict[str, str] = {}
    for name, row in pairs:
        other = seen_ids.setdefault(row["id"], name)
        if other != name:
            raise DataError(f"split leakage: id '{row['id']}' is in both '{other}' and '{name}'.")
    groups = near_duplicate_groups([row["prompt"] for _, row in pairs], prefix_chars)
    owner: dict[int, int] = {}
    for i, group in enumerate(groups):
        j = owner.setdefault(group, i)
        if pairs[j][0] != pairs[i][0]:
            (split_a, a), (split_b, b) = pairs[j], pairs[i]
            raise DataError(
                f"split leakage: '{a['id']}' ({split_a}) and '{b['id']}' ({split_b}) are near-duplicates "
                f"(shared normalised prefix of {prefix_chars} characters, transitively): "
                f"{dedup_key(a['prompt'], prefix_chars)!r} / {dedup_key(b['prompt'], prefix_chars)!r}."
            )


def validation_split(rows: Sequence[Mapping[str, Any]], fraction: float, prefix_chars: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of `rows`, near-duplicate groups kept on one side.

    For holding out SFT demonstrations (cfg.data.validation_fraction); at least one row is held out
    when `fraction` > 0 and there are two or more groups.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    groups = near_duplicate_groups([r["prompt"] for r in rows], prefix_chars)
    members: dict[int, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    want = round(fraction * len(rows))
    if fraction > 0 and len(order) > 1:
        want = max(want, 1)
    held: list[int] = []
    for group in order[:-1]:  # never hold out everything
        if len(held) >= want:
            break
        held.extend(members[group])
    held_set = set(held)
    return [i for i in range(len(rows)) if i not in held_set], sorted(held)
