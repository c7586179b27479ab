#!/usr/bin/env bash
# Prove and measure the GPU path on one GPU machine with torch, transformers, peft and accelerate but no network,
# in under 6 minutes, into one log. Prepare the bundle here first (`make gpu-bundle`), then on the device, from
# the repository root with .gpu_bundle carried:
#
#     bash bench/gpu_proof.sh                 # log: $OUT/gpu_proof.log when $OUT is set, else bench/results/
#
# Steps, each with its wall-clock seconds in the log: the machine (GPU, torch, CUDA); the bundle's wheels
# installed into /tmp/site; the fast test selection with CUDA visible (the suite is device-agnostic: CI runs
# it with none); the `micro` study stage by stage with the frozen base in 4-bit nf4 (QLoRA), then again
# unquantised; the generation bench at `micro` on CUDA. Commit the log under bench/results.
# On a machine without CUDA it still runs (to check the script itself) and says the log proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUNDLE=${BUNDLE:-.gpu_bundle}
LOG=${1:-${OUT:-bench/results}/gpu_proof.log}
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
failures=0
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S) UTC)"; }
timed() {  # timed SECONDS LABEL COMMAND...: run with a time limit, print status and seconds, count failures
    local limit=$1 label=$2; shift 2
    local started=$SECONDS
    timeout "$limit" "$@"
    local status=$?
    echo "--- $label: exit $status in $((SECONDS - started)) s"
    [ $status -eq 0 ] || failures=$((failures + 1))
}

step "machine"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
"$PY" -c 'import torch, transformers, peft, accelerate; print(f"python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}"); print("cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "NO CUDA: this run checks the script only and proves nothing about the GPU path"
fi

step "bundle"
if [ -d "$BUNDLE/wheels" ]; then
    timed 120 "install wheels" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no $BUNDLE/wheels: using the packages already installed"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
work=$(mktemp -d)
export RLHF_CACHE_DIR="$work/cache"
mkdir -p "$RLHF_CACHE_DIR"
[ -d "$BUNDLE/cache/models" ] && cp -r "$BUNDLE/cache/models" "$RLHF_CACHE_DIR/"
"$PY" -c 'import sys; sys.path.insert(0, "tests"); from pathlib import Path; from bigbench_fixture import write_bigbench_tree; print("fixture BIG-bench tree:", write_bigbench_tree(Path(sys.argv[1]), n=24))' "$work/bigbench/benchmark_tasks"
export RLHF_BIGBENCH_TASKS="$work/bigbench/benchmark_tasks"

step "fast tests, CUDA visible"
workers=$("$PY" -c 'import importlib.util as u; print("-n 8" if u.find_spec("xdist") else "")')
# shellcheck disable=SC2086
timed 170 "fast tests" "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not notebooks" $workers \
    ${PROOF_TESTS:-tests}  # PROOF_TESTS: a smaller selection, to check the script on a slow machine

for precision in 4bit full; do
    step "micro study, stage by stage, base in $precision"
    overrides='{}'
    [ "$precision" = 4bit ] && overrides='{"model.quantize_4bit": true}'
    for stage in data sft reward ppo analysis; do
        timed 90 "micro $precision $stage" "$PY" -m rlhf_lib.stages "$stage" --preset micro --no-progress \
            --runs-dir "$work/runs-$precision" --overrides-json "$overrides"
    done
done

step "generation bench, micro"
timed 90 "generation bench" "$PY" bench/bench_generation.py --preset micro --prompts 32 --repeats 2

step "done"
echo "$failures step(s) failed; total $SECONDS s"
rm -rf "$work"
exit $((failures > 0))
