"""The export command: `export_study` (every artifact of a finished study, each with its card), the Hub (only with
--push-to-hub) and `main`.

    python -m rlhf_lib.export --size tiny --out exports/tiny
    python -m rlhf_lib.export --size tiny --out exports/tiny --push-to-hub me/instructgpt-tiny  # off by default
"""


from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_lib.artifacts import read_meta
from rlhf_lib.export.cards import comparisons_card, policy_card, reward_card
from rlhf_lib.export.common import (
    COMPARISONS_DIR,
    HUB_SUFFIXES,
    POLICIES,
    REPO,
    REWARD_DIR,
    REWARD_OWN_FORMAT_DIR,
    study_context,
)
from rlhf_lib.export.comparisons import export_comparisons
from rlhf_lib.export.policies import export_policy
from rlhf_lib.export.reward_model import export_reward_model
from rlhf_lib.pipeline import RunPaths, default_runs_root

# --------------------------------------------------------------------------------------------
# The Hub (only with --push-to-hub)
# --------------------------------------------------------------------------------------------


def hub_repo_ids(prefix: str, exported: Sequence[str]) -> dict[str, str]:
    """Repository id of each exported folder: <prefix>-sft, -ppo, -ppo-ptx, -reward-model, -comparisons."""
    return {name: prefix + HUB_SUFFIXES[name] for name in exported}


def push_to_hub(folder: Path, repo_id: str, repo_type: str = "model", private: bool = True) -> None:
    """Create the repository (private unless told otherwise) and upload the folder. Network: only here."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                      ignore_patterns=["arrow/**"] if repo_type == "dataset" else None)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _write_card(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text, encoding="utf-8")


def export_study(paths: RunPaths, out: Path, results_dir: Path, progress=print) -> dict[str, Any]:
    """Export every finished artifact of one preset's study into `out`; returns what export.json records."""
    ctx = study_context(paths, results_dir)
    paths.require("sft")  # nothing to export without it: a clear error saying what to run
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"preset": ctx.preset, "seed": ctx.seed, "exported": {}, "skipped": {}}
    for name, (stage, relative) in POLICIES.items():
        policy_dir = paths.stage(stage) / relative
        if stage not in ctx.records or not (policy_dir / "meta.json").exists():
            report["skipped"][name] = f"no finished {stage} stage with {relative} ({paths.stage(stage)})"
            continue
        progress(f"export: {name} policy <- {policy_dir}")
        folder = export_policy(policy_dir, out / name)
        _write_card(folder, policy_card(name, ctx, bool(read_meta(policy_dir).get("quantize_4bit"))))
        report["exported"][name] = str(folder)
    if "reward" in ctx.records:
        progress(f"export: reward model <- {paths.stage('reward') / 'model'}")
        folder, summary = export_reward_model(paths.stage("reward") / "model", out)
        other = REWARD_OWN_FORMAT_DIR if folder.name == REWARD_DIR else REWARD_DIR
        shutil.rmtree(out / other, ignore_errors=True)  # an earlier export's other form would contradict this one
        _write_card(folder, reward_card(ctx, summary))
        report["exported"][folder.name] = str(folder)
        report["reward_model"] = summary
        progress("export: comparisons")
        counts = export_comparisons(paths.stage("reward"), out / COMPARISONS_DIR)
        _write_card(out / COMPARISONS_DIR, comparisons_card(ctx, counts))
        report["exported"][COMPARISONS_DIR] = str(out / COMPARISONS_DIR)
        report["comparisons"] = counts
    else:
        report["skipped"]["reward_model"] = report["skipped"]["comparisons"] = f"no finished reward stage ({paths.stage('reward')})"
    (out / "export.json").write_text(json.dumps(report, indent=1))
    return report


def push_exports(report: dict[str, Any], prefix: str, private: bool = True, progress=print) -> dict[str, str]:
    """Push every exported folder to <prefix>-<artifact> (the comparisons as a dataset repository)."""
    repos = hub_repo_ids(prefix, list(report["exported"]))
    for name, repo_id in repos.items():
        progress(f"push: {report['exported'][name]} -> {repo_id}")
        push_to_hub(Path(report["exported"][name]), repo_id, "dataset" if name == COMPARISONS_DIR else "model", private)
    return repos


DESCRIPTION = ("Export a finished study in the formats the RLHF ecosystem reads: transformers checkpoints, a datasets\n"
               "dataset, model cards, and (behind a flag) the Hugging Face Hub.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_lib.export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="preset whose finished study is exported (default: tiny)")
    parser.add_argument("--out", required=True, help="folder to write the exports into")
    parser.add_argument("--runs-dir", default="", help="stage artifacts folder, as run_all.py's (default: runs/); "
                        "its <size>/ subfolder is read")
    parser.add_argument("--results-dir", default="", help="where findings.json is (default: results/<size>/)")
    parser.add_argument("--overrides-json", default="{}", help="the dotted overrides the study ran with, as JSON "
                        "(they change the stage fingerprints), e.g. '{\"ppo.iterations\": 10}'")
    parser.add_argument("--push-to-hub", default="", metavar="REPO_PREFIX",
                        help="also upload each folder to <REPO_PREFIX>-sft, -ppo, ... (off by default)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: public repositories (default private)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from rlhf_lib.config import load_preset

    args = parse_args(argv)
    cfg = load_preset(args.size, json.loads(args.overrides_json or "{}"))
    runs_root = Path(args.runs_dir).expanduser().resolve() if args.runs_dir else default_runs_root()
    paths = RunPaths.for_config(cfg, runs_root / args.size)
    results_dir = Path(args.results_dir) if args.results_dir else REPO / "results" / args.size
    try:
        report = export_study(paths, Path(args.out).expanduser().resolve(), results_dir)
    except FileNotFoundError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    for name, reason in report["skipped"].items():
        print(f"export: skipped {name}: {reason}")
    if "refused" in report.get("reward_model", {}):
        print(f"export: reward model copied in the study's own format: {report['reward_model']['refused']}")
    if args.push_to_hub:
        push_exports(report, args.push_to_hub, private=not args.public)
    print(f"export: wrote {', '.join(report['exported'])} to {args.out}")
    return 0
