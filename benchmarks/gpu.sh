#!/usr/bin/env bash
# The side-by-side benchmark on one NVIDIA GPU: MLX's CUDA backend (this engine, mlx-vlm, the
# mlx-lm AR twin) and torch (transformers), bf16, sizes full-slice then full, in under 10 minutes.
#
# The GPU machine is offline and takes at most 64 MiB of files per command, so MLX travels in two
# halves (the mlx-cuda wheel alone is ~86 MiB). From the repository root:
#
#   here, once (needs pip and the registry):
#     bash ../shared/tools/mlx-cuda-carry.sh     # -> .mlxcuda1/ .mlxcuda2/ (mlx + mlx-cuda-13, CPython 3.12)
#     bash benchmarks/gpu.sh prepare             # -> .whl/ (mlx-lm, mlx-vlm: pure Python, no deps)
#   on the GPU machine, two back-to-back commands while it stays up:
#     1) carry .mlxcuda1:          bash benchmarks/gpu.sh part1
#     2) carry .mlxcuda2 and .whl: bash benchmarks/gpu.sh run
#
# `run` writes the result files to $OUT when set (the device tool brings them back), else to
# benchmarks/results/. Jobs stop starting after BUDGET_S seconds (default 420) so the command ends
# inside 10 minutes; rows not reached are recorded as skipped. SIZES overrides the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_LM_VERSION="${MLX_LM_VERSION:-0.32.2}"
MLX_VLM_VERSION="${MLX_VLM_VERSION:-0.7.10}"

case "${1:-}" in
prepare)
    grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "mlx-lm==$MLX_LM_VERSION" "mlx-vlm==$MLX_VLM_VERSION"
    ls -la .whl
    [ -d .mlxcuda1 ] && [ -d .mlxcuda2 ] || echo "now run: bash ../shared/tools/mlx-cuda-carry.sh"
    ;;
part1)
    mkdir -p /tmp/mlxparts && cp .mlxcuda1/* /tmp/mlxparts/
    echo "part 1 in place; next: carry .mlxcuda2 and .whl, run 'bash benchmarks/gpu.sh run'"
    ;;
run)
    cp .mlxcuda2/* /tmp/mlxparts/
    mkdir -p /tmp/site
    cat /tmp/mlxparts/part_* | xz -d | tar x -C /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    python3 -c "import mlx.core as mx, torch; assert mx.default_device().type == mx.DeviceType.gpu, mx.default_device(); \
assert torch.cuda.is_available(); print('mlx', mx.__version__, mx.default_device(), '| torch', torch.__version__, torch.cuda.get_device_name())"
    out="${OUT:-benchmarks/results}"
    # mlx-vlm is on PYTHONPATH only here: the bench python is the machine's own python3
    python3 -m benchmarks.run --sizes "${SIZES:-full-slice,full}" --dtype bfloat16 --bench-python "$(command -v python3)" \
        --openblas "" --budget-s "${BUDGET_S:-420}" --timeout 300 --work-dir /tmp/dgbench --out "$out"
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
