#!/usr/bin/env bash
# The closing GPU check of a session, in one call: every test compiled on the GPU (the kernel
# tests with TRITON_INTERPRET unset, then every other gpu-marked test), then the kernel table
# with the shipped configuration. Writes logs and results into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/fastkd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "Running pip as" | tail -3
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger_kernel-*.whl \
    2>&1 | grep -v "Running pip as" | tail -3
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
echo "=== kernel tests, compiled"
timeout 180 python3 -m pytest tests/ops -q $xdist -p no:cacheprovider -rfE 2>&1 | tee "$OUT/tests-ops.log" | tail -12
echo "=== every other gpu-marked test"
timeout 180 python3 -m pytest tests -m gpu --ignore=tests/ops -q -p no:cacheprovider -rfEs 2>&1 | tee "$OUT/tests-gpu.log" | tail -25
echo "=== kernel table (shipped configuration)"
timeout 120 python3 -m fastkd.cli bench kernels --warmup 10 --rep 50 --save --results-dir "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -20
