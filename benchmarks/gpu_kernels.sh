#!/usr/bin/env bash
# One GPU visit for the fused KD kernels (fastkd.kernels): compiled tests, a tuning sweep of the
# chunked path, then the benchmark table (fastkd vs eager / torch.compile / Liger) at the three
# bf16 shapes, and the other methods at two shapes. Runs from the repository root:
#
#     bash benchmarks/gpu_kernels.sh            # writes into $OUT (or /tmp/fastkd-gpu)
#
# Offline machine: the package is installed with --no-deps; Liger-Kernel is used when its
# wheel was carried into .whl/ (see the report in notes or the device README).
# Results: $OUT/kernels-<gpu>.{jsonl,md} (copy them to benchmarks/results/), logs beside them.
set -uo pipefail
OUT=${OUT:-/tmp/fastkd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
start=$SECONDS
stamp() { echo "[gpu_kernels +$((SECONDS - start))s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "Running pip as" | tail -3
  if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/liger_kernel-*.whl 2>&1 | grep -v "Running pip as" | tail -3
  fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
cat "$OUT/gpu.txt"

stamp "1/4 kernel tests, compiled (tests/ops)"
xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 240 python3 -m pytest tests/ops -q $xdist -p no:cacheprovider -rfEs 2>&1 | tee "$OUT/tests.log" | tail -25

stamp "2/4 chunked-path sweep (fastkd only)"
timeout 100 python3 -m fastkd.cli bench kernels --shapes 4096x32000,8192x128256 --impls fastkd --sweep \
  --warmup 10 --rep 40 --json "$OUT/sweep.json" 2>&1 | tail -30
best=$(python3 - "$OUT/sweep.json" <<'PY'
import json, sys
from collections import defaultdict
try:
    rows = json.load(open(sys.argv[1]))["sweep"]
except Exception:
    print(""); sys.exit()
tot, cnt = defaultdict(float), defaultdict(int)
for r in rows:
    if "ms" in r:
        key = (r["chunk"], r["warps"], int(r["prefetch"]))
        tot[key] += r["ms"] / max(x["ms"] for x in rows if "ms" in x and x["C"] == r["C"])  # per-shape normalised
        cnt[key] += 1
n = max(cnt.values()) if cnt else 0
ok = [k for k in tot if cnt[k] == n]
if ok:
    k = min(ok, key=lambda k: tot[k])
    print(f"chunk={k[0]},warps={k[1]},prefetch={k[2]}")
PY
)
stamp "best chunked configuration in this sweep: ${best:-none} (the tables below use the shipped defaults)"
best=""

stamp "3/4 benchmark table, kd + CE, bf16"
timeout 240 python3 -m fastkd.cli bench kernels ${best:+--config $best} --warmup 10 --rep 50 --save \
  --results-dir "$OUT" 2>&1 | tee "$OUT/bench.log"

stamp "3b/4 GPU time without host overhead (CUDA-graph replay), 256x1000 and 4096x32000"
timeout 120 python3 -m fastkd.cli bench kernels ${best:+--config $best} --impls fastkd,eager,compile --graphs \
  --shapes 256x1000,4096x32000 --warmup 10 --rep 50 2>&1 | grep -E "^\||copy" | tee "$OUT/graphs.log"

stamp "4/4 other methods (fastkd vs the PyTorch reference)"
for m in dkd ats isats; do
  timeout 60 python3 -m fastkd.cli bench kernels ${best:+--config $best} --method $m --impls fastkd,eager \
    --shapes 256x1000,4096x32000 --warmup 10 --rep 40 --save --results-dir "$OUT" 2>&1 | grep -E "^\||copy" 
done | tee "$OUT/methods.log"
stamp "done"
