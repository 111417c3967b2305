#!/usr/bin/env bash
# Everything this project measures on an NVIDIA GPU, in one lease of under 10 minutes:
#   A. the torch backend's speed against transformers' generate (benchmarks/torch_gpu.py), then the
#      fast path's gate on the sort model with MLX's CUDA backend (benchmarks/fast_path.py), alone
#      on the GPU so the timings are clean;
#   B. then, side by side: training the Sudoku model and its autoregressive baseline with MLX's
#      CUDA backend (training/sudoku_gpu*.yaml, steps chosen to fit the time left), the CUDA twins
#      of the kernels against their fallbacks (doctor --recheck, and the kernel and fast-path
#      tests with MLX on the GPU), and the torch parity suite and bf16 agreement on CUDA.
#
# The GPU machine is offline and takes 64 MiB of files per command, so MLX travels in two halves.
# Here, once:   bash ../shared/tools/mlx-cuda-carry.sh          # -> .mlxcuda1/ .mlxcuda2/
#               bash benchmarks/gpu_session.sh prepare           # -> .whl/ (mlx-lm, transformers)
# There, two back-to-back commands while the machine stays up:
#   1) carry .mlxcuda1:           bash benchmarks/gpu_session.sh part1
#   2) carry .mlxcuda2 and .whl:  bash benchmarks/gpu_session.sh run
# `run` ends inside TOTAL_S seconds (default 560) and leaves in $OUT: results.tar.gz (logs and
# JSON/Markdown results) and models.tar.part_* (the two trained Sudoku models; cat, then untar).
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl mlx-lm==0.32.2 transformers==5.24.0
    ls -la .whl
    ;;
part1)
    mkdir -p /tmp/mlxparts && cp .mlxcuda1/* /tmp/mlxparts/
    nvidia-smi -L
    ;;
run)
    T0=$(date +%s)
    END=$((T0 + ${TOTAL_S:-560}))
    out="${OUT:-benchmarks/results/gpu-session}"
    r="$out/r"
    mkdir -p "$r"
    cp .mlxcuda2/* /tmp/mlxparts/ && mkdir -p /tmp/site
    cat /tmp/mlxparts/part_* | xz -d | tar x -C /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    python3 -c "import mlx.core as mx, torch, transformers; print('mlx', mx.__version__, mx.default_device(), \
'| torch', torch.__version__, torch.cuda.get_device_name(), '| transformers', transformers.__version__)" 2>&1 | tee "$r/versions.txt"
    echo "unpacked in $(( $(date +%s) - T0 )) s"

    # A. speed, alone on the GPU
    timeout "${SPEED_S:-200}" python3 benchmarks/torch_gpu.py --device cuda --skip parity,agreement \
        --canvases 1 --repeats 2 --out "$r" > "$r/torch_speed.log" 2>&1
    echo "A done at $(( $(date +%s) - T0 )) s (rc $?)" | tee -a "$r/timeline.txt"
    # A2. the fast path's gate on the GPU (MLX's CUDA backend), still alone: the sort model, the
    # reference against settled and short on the same lists (#6 asks for the wall time on a GPU)
    touch /tmp/fast_path.marker
    timeout "${FAST_S:-90}" python3 -m benchmarks.fast_path --task sort --model sort --puzzles "${FAST_LISTS:-100}" \
        --modes settled,short > "$r/fast_path_gpu.log" 2>&1
    echo "A2 done at $(( $(date +%s) - T0 )) s (rc $?)" | tee -a "$r/timeline.txt"
    find benchmarks/results -name 'fast_path-*' -newer /tmp/fast_path.marker -exec cp {} "$r/" \;

    # B. training, with the correctness checks alongside
    DEADLINE=$((END - 30))
    mkdir -p /tmp/models
    timeout $((END - $(date +%s))) python3 training/train_sudoku.py --config training/sudoku_gpu.yaml --device gpu \
        --budget-s $((DEADLINE - $(date +%s))) --safety 0.6 --steps-file /tmp/steps --deadline "$DEADLINE" \
        --out-dir /tmp/run-diffusion --export /tmp/models/sudoku > "$r/train_diffusion.log" 2>&1 &
    dpid=$!
    # the baseline trains for the steps the diffusion run chose, alongside it; not at all if that run failed
    (while [ ! -f /tmp/steps ] && kill -0 $dpid 2>/dev/null; do sleep 1; done
     [ -f /tmp/steps ] && exec timeout $((END - $(date +%s))) python3 training/train_sudoku.py --baseline \
        --config training/sudoku_gpu_autoregressive.yaml --device gpu --steps "$(cat /tmp/steps)" --deadline "$DEADLINE" \
        --out-dir /tmp/run-autoregressive --export /tmp/models/sudoku-autoregressive) > "$r/train_autoregressive.log" 2>&1 &
    timeout 120 python3 -m mlx_diffgemma.doctor --json --recheck --budget 10 > "$r/doctor-cuda.json" 2> "$r/doctor.log"
    MLX_DIFFGEMMA_TEST_DEVICE=gpu timeout 150 python3 -m pytest -q -p no:cacheprovider \
        tests/test_epilogue.py tests/test_kernels.py tests/test_fast.py > "$r/pytest-mlx-cuda.log" 2>&1
    MLX_DIFFGEMMA_TEST_DEVICE=cpu timeout $((DEADLINE - $(date +%s))) python3 benchmarks/torch_gpu.py --device cuda \
        --skip speed --parity-timeout 200 --out "$r" > "$r/torch_parity.log" 2>&1
    echo "checks done at $(( $(date +%s) - T0 )) s" | tee -a "$r/timeline.txt"
    wait
    echo "training done at $(( $(date +%s) - T0 )) s" | tee -a "$r/timeline.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$r/gpu.csv" 2>&1
    tar czf "$out/results.tar.gz" -C "$r" . && rm -rf "$r"
    [ -d /tmp/models ] && tar cf - -C /tmp/models . | split -b 15M -d - "$out/models.tar.part_"
    ls -la "$out"
    ;;
*)
    sed -n 2,18p "$0"
    exit 2
    ;;
esac
