"""The comparisons as a `datasets` dataset: `pairs` (prompt, chosen, rejected: TRL's preference format) and the
K-wise `rankings`, by split, as save_to_disk folders and JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rlhf_lib import models

# --------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------


def comparison_splits(reward_stage: Path) -> dict[str, list[dict]]:
    """The reward stage's rankings by split: train, heldout_trainlabelers, heldout_heldoutlabelers."""
    from rlhf_lib.reward import COMPARISON_SETS

    splits = {}
    for file_name in COMPARISON_SETS:
        path = Path(reward_stage) / file_name
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            splits[file_name.removeprefix("comparisons_").removesuffix(".jsonl")] = [json.loads(x) for x in lines if x]
    return splits


def preference_pairs(rankings: Sequence[dict]) -> list[dict]:
    """TRL's preference rows: one per untied pair of each ranking (rank 0 is best; ties give no pair)."""
    from rlhf_lib.reward import ranked_pairs

    rows = []
    for row in rankings:
        ended = row.get("completion_ended") or [True] * len(row["completions"])
        for w, lo in ranked_pairs(row["ranks"]):
            rows.append({"prompt": row["prompt"], "chosen": row["completions"][w], "rejected": row["completions"][lo],
                         "prompt_id": row["prompt_id"], "labeler_id": row["labeler_id"],
                         "chosen_rank": int(row["ranks"][w]), "rejected_rank": int(row["ranks"][lo]),
                         "chosen_ended": bool(ended[w]), "rejected_ended": bool(ended[lo])})
    return rows


def _pair_features():
    from datasets import Features, Value

    return Features({"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"),
                     "prompt_id": Value("string"), "labeler_id": Value("string"), "chosen_rank": Value("int32"),
                     "rejected_rank": Value("int32"), "chosen_ended": Value("bool"), "rejected_ended": Value("bool")})


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Saving the dataset" bar per split (six of them say nothing useful)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def export_comparisons(reward_stage: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Write configs `pairs` and `rankings` (save_to_disk under arrow/, JSONL under pairs/ and rankings/).
    Returns {config: {split: rows}}."""
    from datasets import Dataset, DatasetDict

    from rlhf_lib.data.schema import COMPARISON_FEATURES

    splits = comparison_splits(reward_stage)
    if not splits:
        raise FileNotFoundError(f"{reward_stage} holds no comparisons_*.jsonl.")
    tables = {"pairs": {name: preference_pairs(rows) for name, rows in splits.items()},
              "rankings": {name: [{k: row.get(k) for k in COMPARISON_FEATURES} for row in rows]
                           for name, rows in splits.items()}}
    features = {"pairs": _pair_features(), "rankings": COMPARISON_FEATURES}
    with models.atomic_directory(out_dir) as tmp, _quiet_datasets():
        for config, by_split in tables.items():
            DatasetDict({split: Dataset.from_list(rows, features=features[config]) for split, rows in by_split.items()}
                        ).save_to_disk(str(tmp / "arrow" / config))
            for split, rows in by_split.items():
                _write_jsonl(tmp / config / f"{split}.jsonl", rows)
    return {config: {split: len(rows) for split, rows in by_split.items()} for config, by_split in tables.items()}


