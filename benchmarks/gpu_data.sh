#!/usr/bin/env bash
# GPU visit for the input pipelines (fastkd.data): the data tests (CUDA ones included) and the
# data benchmark on CUDA. Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_data.sh                  # writes under $OUT (default ./gpu-out)
#     DALI_WHEELS=/path/to/wheels bash benchmarks/gpu_data.sh   # install DALI first (offline)
#
# Without DALI the DALI rows skip, and the torch backend runs with nvJPEG decoding.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "${DALI_WHEELS:-}" ] && ! python3 -c "import nvidia.dali" 2>/dev/null; then
    python3 -m pip install --no-deps --no-index -q "$DALI_WHEELS"/*.whl 2>&1 | tail -2
fi
python3 -m fastkd check-env 2>&1 | tee "$OUT/data-check-env.txt"

# -s shows the measured GPU-vs-CPU decoder differences printed by the agreement test
timeout 420 python3 -m pytest tests/data -q -rs -s -p no:cacheprovider --durations=8 2>&1 \
    | tee "$OUT/data-tests-gpu.txt" | grep -Ev "^fastkd.data" | tail -40

timeout 480 python3 benchmarks/bench_data.py --device cuda --num-images 2048 --epoch-images 49152 \
    --batch-size 256 --warmup-batches 16 --data-dir /tmp/fastkd-bench-jpegs --results "$OUT/data-gpu.jsonl" 2>&1 \
    | grep -v "nvjpeg_\|ROI decode" | tee "$OUT/data-bench-gpu.txt"

# The KD setting: a teacher view cut from the same crop, bf16, channels_last.
timeout 300 python3 benchmarks/bench_data.py --device cuda --num-images 2048 --epoch-images 49152 \
    --batch-size 256 --warmup-batches 16 --data-dir /tmp/fastkd-bench-jpegs --results "$OUT/data-gpu.jsonl" \
    --teacher-image-size 256 --dtype bfloat16 --channels-last --no-step \
    --backends torchvision,fastkd-torch,fastkd-dali 2>&1 \
    | grep -v "nvjpeg_\|ROI decode" | tee "$OUT/data-bench-gpu-kd.txt"
