#!/usr/bin/env bash
# One GPU visit that measures everything end to end, in at most 8 minutes on one H100/H200,
# installing nothing from the network. Run from anywhere inside the repository:
#
#     FASTKD_COMMIT=$(git rev-parse --short=7 HEAD) bash benchmarks/gpu_visit.sh   # on the GPU machine
#     bash benchmarks/gpu_visit.sh --dry-run       # the same steps on the CPU at tiny sizes (~5 min on 2 cores)
#
# Steps, in this order (each under its own time budget, and all under one deadline, so a hang
# costs one step, never the visit; a step left without time is recorded as skipped):
#   env          GPU, driver, versions, commit, `fastkd check-env`; installs fastkd (pip -e, no deps,
#                offline) and any wheels carried in .whl/ or $WHEELS (Liger-Kernel, DALI)
#   jpegs        an ImageNet-like JPEG folder (2,048 files, ~500 x 375, quality 90) made on the machine
#   ops-tests    tests/ops compiled on the GPU (TRITON_INTERPRET unset), pytest-xdist when present
#   kernels      `fastkd bench kernels`: KD + CE, bf16, 3 shapes, fastkd / eager / compile / Liger
#                (when carried), shipped configuration, CUDA-graph column
#   engine       bench_engine.py on synthetic GPU data: fair naive, naive, sequential, concurrent,
#                CUDA-graph teacher, student-only, teacher-only
#   gpu-tests    every other gpu-marked test (the engine's --compile GPU test included)
#   engine-jpeg  bench_engine.py fed from the JPEG files (DALI when carried, else fastkd's torch
#                loader; the naive loop with torchvision's ImageFolder DataLoader)
#   methods      `fastkd bench kernels --method ats|isats|dkd|dist` vs torch.compile of plain fp32
#   linear       `fastkd bench linear`: the fused linear JSD on an LM head (8192 x 4096 x 128256 and smaller),
#                peak memory and time vs full logits / torch.compile chunked / Liger (when carried)
#   demo         `fastkd demo --device cuda` (the README's first command, on the GPU)
#   engine-compile  bench_engine.py: concurrent vs concurrent + --compile (synthetic data)
#   cache        benchmarks/bench_cache.py (the cached teacher), when that file exists
#   study        `fastkd study capacity --preset full`, when the preset exists (~10 min alone: it
#                starts only with >= 300 s left, so in practice in a call of its own)
#   (optional, not in the default list: sweep = the fused kernel's launch-configuration sweep and
#    the table at its best configuration; data = `fastkd bench data` on the JPEG folder)
# Choose steps with STEPS="env kernels ..." (env always runs); steps run in the order above. What
# the deadline leaves out is listed as skipped: run it in a second call at once (the machine stays
# warm ~30 s), e.g. STEPS="demo engine-compile cache". The last thing printed is a short
# table (python -m fastkd.bench.visit). Results: $OUT/summary.md, $OUT/visit.log and
# $OUT/visit.tar.gz (every log, kernels-*.json/jsonl/md, engine-*.jsonl/md, env.json, the study
# output): unpack it into benchmarks/results/visit-<date>/ and commit (see results/PENDING.md).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_visit.sh: unknown argument $arg (use --dry-run or --help)"; exit 2 ;;
  esac
done

DEFAULT_STEPS="env jpegs ops-tests kernels engine gpu-tests engine-jpeg methods linear demo engine-compile cache study"
STEPS=" env ${STEPS:-$DEFAULT_STEPS} "
DEADLINE=${VISIT_BUDGET_S:-$(( DRY == 1 ? 1200 : 470 ))}  # seconds for the whole visit (on a GPU: 8 minutes less a margin)
OUT=${OUT:-/tmp/fastkd-visit-out}
WORK=$(mktemp -d /tmp/fastkd-visit.XXXXXX)
RESULTS="$WORK/results"
mkdir -p "$OUT" "$RESULTS"
exec > >(tee "$OUT/visit.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
COMMIT=${FASTKD_COMMIT:-$(git rev-parse --short=7 HEAD 2>/dev/null || echo unknown)}
if [ -z "${FASTKD_COMMIT:-}" ] && [ "$COMMIT" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT+dirty"
fi

if [ $DRY = 1 ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export TRITON_INTERPRET=1
  N_JPEGS=32; N_VAL=20; JPEG_WORKERS=1; ENGINE="--dry-run"; KERNELS="--dry-run"; METHOD_SHAPES="8x100"
  LINEAR="--dry-run --repeats 1 --variants torch-full,fastkd,liger"
  PYTEST_MODE="--collect-only"; DEVICE=cpu
else
  PY=${PYTHON:-python3}
  unset TRITON_INTERPRET
  N_JPEGS=2048; N_VAL=256; JPEG_WORKERS=16; ENGINE="--steps 20 --warmup 8"; KERNELS="--warmup 10 --rep 40"
  METHOD_SHAPES="256x1000,4096x32000"; PYTEST_MODE=""; DEVICE=cuda
  LINEAR="--repeats 5 --timeout 60 --shapes 8192x4096x128256,8192x4096x32000"
fi
JPEGS="$WORK/jpegs"
export PY WORK RESULTS COMMIT DEVICE DRY KERNELS METHOD_SHAPES JPEGS
T0=$SECONDS
: > "$WORK/steps.tsv"

# step NAME BUDGET_S COMMAND...: runs COMMAND with a timeout of min(BUDGET, time left before the
# deadline), its output in $WORK/NAME.log (and on the terminal), a line in steps.tsv.
step() {
  local name=$1 budget=$2; shift 2
  if [[ $STEPS != *" $name "* ]]; then return 0; fi
  local left=$(( DEADLINE - (SECONDS - T0) ))
  local t=$(( budget < left ? budget : left ))
  local need=15  # a step that cannot finish in what is left is not started (its output would be lost)
  [ "$name" = study ] && [ $DRY = 0 ] && need=300
  if [ $t -lt $need ]; then
    echo "=== $name: skipped, ${left}s left of the visit's ${DEADLINE}s (needs ${need}s)"
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$budget" >> "$WORK/steps.tsv"
    return 0
  fi
  echo; echo "=== $name (budget ${t}s, +$((SECONDS - T0))s into the visit)"
  local s0=$SECONDS
  local cmd=("$@")
  if declare -F "$1" >/dev/null; then cmd=(bash -c '"$@"' "$1" "$@"); fi  # a function of this script
  timeout -k 10 "$t" "${cmd[@]}" 2>&1 | tee "$WORK/$name.log" | grep -Ev "nvjpeg_|ROI decode|UserWarning|warnings.warn"
  local rc=${PIPESTATUS[0]}
  local status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  echo "=== $name: $status (rc $rc, $((SECONDS - s0))s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - s0))" "$t" >> "$WORK/steps.tsv"
}

env_step() {
  if [ $DRY = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import fastkd.kernels" 2>/dev/null \
      || "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "Running pip as" | tail -3
    local wheels
    wheels=$(ls .whl/*.whl "${WHEELS:-/tmp/fastkd-wheels}"/*.whl 2>/dev/null)
    if [ -n "$wheels" ]; then
      # shellcheck disable=SC2086
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels 2>&1 \
        | grep -v "Running pip as" | tail -3
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  fi
  "$PY" - "$WORK/env.json" "$COMMIT" "$DEVICE" "$DRY" <<'PY'
import json, sys
from fastkd.bench.common import machine
env = machine(sys.argv[3], sys.argv[2])
env["dry_run"] = sys.argv[4] == "1"
for mod in ("nvidia.dali", "liger_kernel", "xdist", "torchvision", "timm"):
    try:
        __import__(mod)
        env[mod] = "yes"
    except Exception:
        env[mod] = "no"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
PY
  "$PY" -m fastkd check-env
}
export -f env_step
step env 60 env_step
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the carried wheels

step jpegs 60 "$PY" -c "from fastkd.bench.data import make_jpeg_folder as m
print(m('$JPEGS/train', $N_JPEGS, workers=$JPEG_WORKERS), m('$JPEGS/val', $N_VAL, seed=1, workers=$JPEG_WORKERS))"

XDIST=""
[ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
# shellcheck disable=SC2086
step ops-tests 150 "$PY" -m pytest tests/ops -q $XDIST $PYTEST_MODE -p no:cacheprovider -rfEs

# shellcheck disable=SC2086
step kernels 100 "$PY" -m fastkd bench kernels $KERNELS --commit "$COMMIT" --save --results-dir "$RESULTS" \
  --json "$WORK/kernels-kd.json"

# shellcheck disable=SC2086
step engine 150 "$PY" benchmarks/bench_engine.py $ENGINE --commit "$COMMIT" --results "$WORK/engine-synthetic.jsonl" \
  --markdown "$WORK/engine-synthetic.md" --modes naive-fair naive fastkd-sequential fastkd-concurrent fastkd-graph \
  student-only teacher-only

# shellcheck disable=SC2086
step gpu-tests 150 "$PY" -m pytest tests -m gpu --ignore=tests/ops -q $PYTEST_MODE -p no:cacheprovider -rfEs \
  --continue-on-collection-errors

# shellcheck disable=SC2086
step engine-jpeg 90 "$PY" benchmarks/bench_engine.py $ENGINE --commit "$COMMIT" --data "$JPEGS" --workers 12 \
  --results "$WORK/engine-jpeg.jsonl" --markdown "$WORK/engine-jpeg.md" \
  --modes naive-fair fastkd-concurrent student-only

# shellcheck disable=SC2086
step methods 110 "$PY" -m fastkd bench kernels $KERNELS --method ats,isats,dkd,dist --impls fastkd,eager,compile \
  --shapes "$METHOD_SHAPES" --commit "$COMMIT" --save --results-dir "$RESULTS" --json "$WORK/kernels-methods.json"

# shellcheck disable=SC2086
step linear 150 "$PY" -m fastkd bench linear $LINEAR --commit "$COMMIT" --results "$WORK/linear.jsonl" \
  --markdown "$WORK/linear.md"

if [ $DRY = 1 ]; then
  step demo 120 "$PY" -m fastkd demo --device cpu --teacher-epochs 1 --student-epochs 1 --cache-dir "$WORK/demo-cache" \
    --output "$WORK/demo"
else
  step demo 100 "$PY" -m fastkd demo --device cuda --cache-dir "$WORK/demo-cache" --output "$WORK/demo"
fi

# torch.compile of both models takes a minute or more: its own step, so a slow compile costs only itself.
# shellcheck disable=SC2086
step engine-compile 150 "$PY" benchmarks/bench_engine.py $ENGINE --commit "$COMMIT" \
  --results "$WORK/engine-compile.jsonl" --markdown "$WORK/engine-compile.md" --modes fastkd-concurrent fastkd-compile

if [ -f benchmarks/bench_cache.py ]; then
  # The cached teacher (benchmarks/bench_cache.py): online KD vs KD from full / top-K caches.
  if [ $DRY = 1 ]; then
    cache_args=(--teacher fastkd:resnet8 --student fastkd:resnet8 --image-size 16 --batch-size 8 --epochs 1)
  else
    backend=torch; "$PY" -c "import nvidia.dali" 2>/dev/null && backend=dali
    cache_args=(--device cuda --teacher torchvision:resnet50 --student torchvision:resnet18 --image-size 224
                --batch-size 256 --amp bf16 --channels-last --workers 12 --data-backend $backend)
  fi
  step cache 100 "$PY" benchmarks/bench_cache.py "${cache_args[@]}" --data "$JPEGS" --commit "$COMMIT" \
    --jsonl "$WORK/cache.jsonl" --markdown "$WORK/cache.md" --workdir "$WORK/cache-work"
else
  [[ $STEPS == *" cache "* ]] && printf 'cache\tskipped\t-\t0\t-\n' >> "$WORK/steps.tsv"  # no cached teacher yet
fi

if "$PY" -m fastkd study capacity --help 2>/dev/null | grep -q "full"; then
  if [ $DRY = 1 ]; then
    step study 90 "$PY" -m fastkd study capacity --preset tiny --device cpu --no-plots --output "$WORK/study"
  else
    # The full preset is sized for about 10 minutes alone: it runs only when the deadline leaves it
    # 300 s or more, i.e. in a call of its own: STEPS=study VISIT_BUDGET_S=580.
    step study 570 "$PY" -m fastkd study capacity --preset full --device cuda --output "$WORK/study"
  fi
else
  [[ $STEPS == *" study "* ]] && printf 'study\tskipped\t-\t0\t-\n' >> "$WORK/steps.tsv"  # no --preset full
fi

# ---- optional steps (STEPS="... sweep data") --------------------------------------------------
sweep() {
  local shapes=4096x32000,8192x128256
  [ $DRY = 1 ] && shapes=4x9000
  # shellcheck disable=SC2086
  "$PY" -m fastkd bench kernels $KERNELS --impls fastkd --shapes $shapes --sweep --commit "$COMMIT" \
    --json "$WORK/sweep.json" || return 1
  local best
  best=$("$PY" - "$WORK/sweep.json" <<'PY'
import json, sys
from collections import defaultdict
rows = [r for r in json.load(open(sys.argv[1]))["sweep"] if "ms" in r]
worst = {c: max(r["ms"] for r in rows if r["C"] == c) for c in {r["C"] for r in rows}}
score, count = defaultdict(float), defaultdict(int)
keys = ("split", "chunk", "warps", "prefetch", "slice", "slice_warps")
for r in rows:
    k = tuple((name, r[name]) for name in keys if name in r)
    score[k] += r["ms"] / worst[r["C"]]  # per-shape normalised
    count[k] += 1
full = [k for k in score if count[k] == max(count.values())]
if full:
    print(",".join(f"{n}={int(v)}" for n, v in min(full, key=score.get)))
PY
)
  echo "best launch configuration of this sweep: ${best:-none}"
  [ -n "$best" ] || return 1
  # The table at that configuration, beside the shipped one (kernels step): is the default still the best?
  # shellcheck disable=SC2086
  "$PY" -m fastkd bench kernels $KERNELS --impls fastkd --shapes $shapes --config "$best" --commit "$COMMIT" \
    --json "$WORK/kernels-best-config.json"
}
export -f sweep
step sweep 100 sweep

data() {  # what benchmarks/gpu_data.sh measured: student view fp32, then the KD setting (teacher view, bf16, NHWC)
  local common=(--data-dir "$JPEGS/train" --num-images "$N_JPEGS" --results "$WORK/data.jsonl" --commit "$COMMIT")
  if [ $DRY = 1 ]; then
    common+=(--device cpu --batch-size 8 --image-size 64 --threads 1)
  else
    common+=(--device cuda --epoch-images 24576 --batch-size 256 --warmup-batches 16)
  fi
  "$PY" -m fastkd bench data "${common[@]}" || return 1  # fastkd-dali rows: DALI carried (results/PENDING.md)
  "$PY" -m fastkd bench data "${common[@]}" --teacher-image-size $(( DRY == 1 ? 72 : 256 )) --dtype bfloat16 \
    --channels-last --no-step --backends torchvision,fastkd-torch,fastkd-dali
}
export N_JPEGS
export -f data
step data 150 data

# ---- results --------------------------------------------------------------------------------
cp "$RESULTS"/* "$WORK/" 2>/dev/null
rm -rf "$JPEGS" "$WORK/demo-cache" "$WORK/cache-work"
"$PY" -m fastkd.bench.visit "$WORK" > "$WORK/summary.md" 2>&1
cp "$WORK/summary.md" "$OUT/summary.md"
tar -czf "$OUT/visit.tar.gz" -C "$WORK" --exclude="*.pt" --exclude="*.npy" .
echo; echo "=== visit done in $((SECONDS - T0))s; results: $OUT/summary.md, $OUT/visit.tar.gz (work dir $WORK)"
echo
cat "$OUT/summary.md"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1  # visit.log complete before the files are collected
