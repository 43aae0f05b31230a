#!/usr/bin/env bash
# The engine's GPU visit, in one go (about 5 minutes on one H100):
#   1. the GPU-marked engine tests (concurrent teacher stream and CUDA-graph teacher vs the
#      sequential oracle, inside real `fastkd train` runs; the runner's stream test);
#   2. bench_engine.py: ResNet-50 -> ResNet-18, 224 px, bf16, batch 256, synthetic GPU data,
#      eager teacher and CUDA-graph teacher; rows appended to benchmarks/results/engine-<gpu>.jsonl;
#   3. bench_engine.py on JPEG files (2,048 ImageNet-like JPEGs; fastkd reads them with DALI when
#      installed, the naive baseline with a torchvision ImageFolder DataLoader);
#   4. `fastkd demo --device cuda` (the GPU paths of the README's first command).
# Skip parts with SKIP="tests bench jpeg demo" (any subset).
# Usage: bash benchmarks/gpu_engine.sh [OUTDIR]   (OUTDIR defaults to $OUT or ./gpu-engine-out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-engine-out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import fastkd.kernels" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "cannot install fastkd"; exit 1; }
python3 -m fastkd check-env
status=0
step() { echo; echo "=== $1"; shift; "$@"; local rc=$?; echo "=== rc $rc"; [ $rc -eq 0 ] || status=1; }

skip=" ${SKIP:-} "
if [[ $skip != *" tests "* ]]; then
  step "GPU engine tests" python3 -m pytest tests/engine -m gpu -q -rA -p no:cacheprovider
fi
if [[ $skip != *" bench "* ]]; then
  step "bench: eager teacher" python3 benchmarks/bench_engine.py --steps 30 --markdown "$out/engine-eager.md"
  step "bench: CUDA-graph teacher" python3 benchmarks/bench_engine.py --steps 30 --teacher-cuda-graph \
    --modes fastkd-concurrent fastkd-sequential teacher-only student-only --markdown "$out/engine-graph.md"
fi
if [[ $skip != *" jpeg "* ]]; then
  python3 -c "from fastkd.bench.data import make_jpeg_folder; make_jpeg_folder('/tmp/fastkd-jpegs', 2048, workers=16)"
  step "bench: JPEG files" python3 benchmarks/bench_engine.py --data /tmp/fastkd-jpegs --steps 24 --workers 12 \
    --modes fastkd-concurrent naive student-only teacher-only --markdown "$out/engine-jpeg.md"
fi
cp benchmarks/results/engine-*.jsonl "$out/" 2>/dev/null
if [[ $skip != *" demo "* ]]; then
  step "demo on the GPU" timeout 300 python3 -m fastkd demo --device cuda --cache-dir /tmp/fastkd-cache \
    --output /tmp/fastkd-demo
fi
exit $status
