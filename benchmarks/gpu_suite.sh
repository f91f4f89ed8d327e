#!/usr/bin/env bash
# The GPU measurements behind benchmarks/README.md, in one go (one device lease):
#   bash benchmarks/gpu_suite.sh OUT_DIR [BASELINE_TREE]
# BASELINE_TREE is a checkout of the code before the speed-ups (its quantmoe/ is run as is).
# STEPS picks and orders the steps (default: the single-GPU ones; the 2-GPU steps one-gpu-3L,
# two-gpu-3L and compare-1v2 need an nvidia-h200-x2-like machine); OPTS are extra
# `quantmoe quantize` options for this tree's runs (e.g. "--batch-size 4").
# Steps are independent: one failing or timing out does not stop the rest.
# EXTRA=--reduced runs the same steps at reduced size on CPU (a dry run of this script). SHAPE picks the
# checkpoint's shape among scale.py's --shape names (default mixtral-8x7b).
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR [BASELINE_TREE]}
BASE=${2:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
W=/tmp/quantmoe-scale
R=$OUT/results
mkdir -p "$R" "$W"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
SHAPE=${SHAPE:-mixtral-8x7b}
EXTRA=${EXTRA:-}
OPTS=${OPTS:-}
STEPS=${STEPS:-"new-tf32-4L new-fp32-2L baseline-1L compare solve"}
PY=${PYTHON:-python3}
BENCH=($PY "$HERE/benchmarks/scale.py" --work "$W" --results "$R" $EXTRA)
step() { echo "=== $(date +%T) $*"; }

step gpu; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step checkpoint
$PY - "$HERE" "$W" "$SHAPE" "$EXTRA" <<'PYEOF'
import sys, time
sys.path.insert(0, sys.argv[1] + "/benchmarks"); sys.path.insert(0, sys.argv[1])
from pathlib import Path
import scale
t0 = time.time()
reduced = "--reduced" in sys.argv[4].split()
src = scale.make_checkpoint(Path(sys.argv[2]) / "mixtral-4L", sys.argv[3], 4, reduced=reduced,
                           device="cpu" if reduced else "auto")
for n in (1, 2, 3):
    scale.make_view(src, Path(sys.argv[2]) / f"mixtral-{n}L", n)
print(f"checkpoint written in {time.time() - t0:.1f}s")
PYEOF
for s in $STEPS; do
    step "$s"
    case $s in
    gputests) (cd "$HERE" && timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py) ;;
    new-tf32-4L) timeout 260 "${BENCH[@]}" --model "$W/mixtral-4L" --name gpu-new-tf32-4L --keep --timeout 230 --tf32 $OPTS ;;
    new-tf32-2L) timeout 200 "${BENCH[@]}" --model "$W/mixtral-2L" --name gpu-new-tf32-2L --timeout 180 --tf32 $OPTS ;;
    new-fp32-2L) timeout 200 "${BENCH[@]}" --model "$W/mixtral-2L" --name gpu-new-fp32-2L --keep --timeout 180 $OPTS ;;
    baseline-1L) [ -n "$BASE" ] && timeout 200 "${BENCH[@]}" --model "$W/mixtral-1L" --name gpu-baseline-1L --keep \
                     --quantmoe "$BASE" --timeout 180 ;;
    compare)
        [ -n "$BASE" ] && timeout 90 "${BENCH[@]}" --compare "$W/out-gpu-baseline-1L" "$W/out-gpu-new-fp32-2L" \
            --model "$W/mixtral-2L" --name compare-baseline-vs-new-fp32
        timeout 90 "${BENCH[@]}" --compare "$W/out-gpu-new-fp32-2L" "$W/out-gpu-new-tf32-4L" --model "$W/mixtral-2L" \
            --name compare-fp32-vs-tf32 ;;
    one-gpu-3L) timeout 200 "${BENCH[@]}" --model "$W/mixtral-3L" --name gpu-1proc-tf32-3L --keep --timeout 180 --tf32 $OPTS ;;
    two-gpu-3L) timeout 200 "${BENCH[@]}" --model "$W/mixtral-3L" --name gpu-2proc-tf32-3L --keep --timeout 180 --tf32 \
                    --nproc 2 $OPTS ;;
    compare-1v2) timeout 90 "${BENCH[@]}" --compare "$W/out-gpu-1proc-tf32-3L" "$W/out-gpu-2proc-tf32-3L" \
                     --model "$W/mixtral-3L" --name compare-1proc-vs-2proc-tf32 ;;
    solve) [ -z "$EXTRA" ] && timeout 120 "${BENCH[@]}" --solve-bench ${BASE:+--baseline "$BASE"} --name gpu-solve-bench ;;
    esac
done
step done
ls -la "$R"
