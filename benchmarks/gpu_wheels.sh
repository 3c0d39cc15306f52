#!/usr/bin/env bash
# Download here (with internet) the wheels that a bare GPU machine without a package index lacks,
# for CPython 3.12 on Linux x86_64, into ./wheels (gitignored). benchmarks/gpu_check.sh installs them
# there with `pip install --no-index --no-deps --target` into a temporary folder; carry the folder along
# (the device tool's `carry: ["wheels"]`). Versions come from constraints.txt. About 6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheels}
PY=${PYTHON:-python3}
# deepspeed's own dependencies that the GPU image lacks (psutil among them), webdataset, timm, and
# pytest with the plugins and dependencies tests/gpu needs (--strict-markers knows pytest-timeout's marker)
PACKAGES="deepspeed hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand timm
einops py-cpuinfo msgpack psutil pytest pluggy iniconfig pygments pytest-timeout"
pins=()
for name in $PACKAGES; do
    line=$(grep -iE "^${name//[-_]/[-_]}==" constraints.txt) || { echo "gpu_wheels: $name is not in constraints.txt" >&2; exit 1; }
    pins+=("$line")
done
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
# deepspeed is published as an sdist only: build its (pure Python) wheel here, without compiling ops.
deepspeed=$(printf '%s\n' "${pins[@]}" | grep -i '^deepspeed==')
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "$deepspeed" 2>/dev/null \
    || DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps -w "$OUT" "$deepspeed"
others=$(printf '%s\n' "${pins[@]}" | grep -vi '^deepspeed==')
# Not a dependency, so not in constraints.txt: NVML's bindings, which cluster images often have and
# which turn on DeepSpeed's NVML path (tests/gpu/test_trainer_cuda.py names a GPU by UUID through it).
others+=" nvidia-ml-py==13.615.71"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$OUT" $others
ls -la "$OUT"
du -sh "$OUT"
